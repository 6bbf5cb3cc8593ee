"""``bbdecoder export RUN_DIR --mlflow [URI]`` and ``--wandb [PROJECT]`` (registered by the CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_export_arguments(group: Any) -> None:
    """Add ``--mlflow`` and ``--wandb`` to the export command's mutually exclusive target group."""
    group.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="log to MLflow at this tracking URI (default: MLFLOW_TRACKING_URI or ./mlruns)",
    )
    group.add_argument(
        "--wandb",
        nargs="?",
        const="bbdecoder",
        metavar="PROJECT",
        help="log to a W&B run in PROJECT (default bbdecoder); offline unless WANDB_MODE says otherwise",
    )


def wants_sink(args: argparse.Namespace) -> bool:
    return getattr(args, "mlflow", None) is not None or getattr(args, "wandb", None) is not None


def export_to_sink(run: Path, args: argparse.Namespace) -> str:
    """Run the export the arguments ask for; returns the line to print."""
    if getattr(args, "mlflow", None) is not None:
        from bbdecoder.sinks.mlflow_sink import export_mlflow

        run_id = export_mlflow(run, args.mlflow or None)
        return f"logged {run} to MLflow run {run_id}" + (f" at {args.mlflow}" if args.mlflow else "")
    from bbdecoder.sinks.wandb_sink import export_wandb

    folder = export_wandb(run, project=args.wandb)
    return f"logged {run} to the W&B run in {folder} (upload an offline run with: wandb sync {folder})"
