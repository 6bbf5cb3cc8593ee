"""MLflow: live logging (:class:`MLflowSink`) and export of a stored run (:func:`export_mlflow`).

Needs ``mlflow`` or ``mlflow-skinny`` (``pip install bbdecoder[mlflow]``). Values are logged as they
are stored, NaN and Inf included; steps are the store's steps, timestamps its step times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bbdecoder.sinks.live import StepBuffer, attach_sink
from bbdecoder.sinks.stored import stored_steps
from bbdecoder.store.reader import RunReader, open_run
from bbdecoder.store.writer import RunWriter

BATCH = 1000  # MLflow's limit of metrics per log_batch call


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise ImportError(
            "the MLflow sink needs mlflow: pip install mlflow-skinny (or bbdecoder[mlflow])"
        ) from err
    return MlflowClient(tracking_uri=tracking_uri)


class MLflowSink:
    """Logs each step's metrics to one MLflow run (created in ``experiment``, default "bbdecoder").

    Use :meth:`attach` to follow an Analyzer's writer: ``MLflowSink(uri).attach(analyzer.writer)``.
    ``run_id`` is the MLflow run's id.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "bbdecoder",
        run_name: str | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        self.client = _client(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id if found is not None else self.client.create_experiment(experiment)
        )
        self.run_id: str = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param

        if params:
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_step(self, step: int, metrics: dict[str, float], timestamp: float) -> None:
        from mlflow.entities import Metric

        millis = int(timestamp * 1000)
        items = [Metric(key, value, millis, step) for key, value in metrics.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def attach(self, writer: RunWriter) -> StepBuffer:
        """Log every row ``writer`` receives from now on; the MLflow run ends when the writer closes."""
        return attach_sink(writer, self)


def export_mlflow(
    run: str | Path | RunReader,
    tracking_uri: str | None = None,
    experiment: str = "bbdecoder",
    run_name: str | None = None,
) -> str:
    """Log a stored run to MLflow (every per-step value and the loss; the run's metadata as params);
    returns the MLflow run id."""
    reader = run if isinstance(run, RunReader) else open_run(run)
    try:
        name = run_name or reader.path.parent.name
        sink = MLflowSink(tracking_uri, experiment, name, params=reader.meta())
        for step, metrics, timestamp in stored_steps(reader):
            sink.log_step(step, metrics, timestamp)
        sink.close()
    finally:
        if not isinstance(run, RunReader):
            reader.close()
    return sink.run_id
