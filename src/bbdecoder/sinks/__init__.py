"""Sinks: the run's statistics logged live to MLflow or Weights & Biases, or exported from a store
(``bbdecoder export RUN_DIR --mlflow URI`` / ``--wandb PROJECT``). Optional extras: ``mlflow`` (or
``mlflow-skinny``) and ``wandb``. Names group one statistic of every layer (see :mod:`.names`)."""

from bbdecoder.sinks.live import Sink, attach_sink
from bbdecoder.sinks.mlflow_sink import MLflowSink, export_mlflow
from bbdecoder.sinks.names import metric_name
from bbdecoder.sinks.wandb_sink import WandbSink, export_wandb, read_wandb_offline

__all__ = [
    "MLflowSink",
    "Sink",
    "WandbSink",
    "attach_sink",
    "export_mlflow",
    "export_wandb",
    "metric_name",
    "read_wandb_offline",
]
