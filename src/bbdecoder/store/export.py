"""Export a finished run to TensorBoard event files (and CSV/Parquet through the reader).

Tags (the live logger of :mod:`bbdecoder.monitor.tensorboard` uses the same for what both write):

- ``loss`` per step;
- gradient statistics ``grad_<stat>/<param>`` per step (``mean``, ``mean_abs``, ``max_abs``, ``var``,
  ``l1``, ``l2``); every other per-step statistic ``<stat>/<param or layer>`` (``update_ratio``,
  ``weight_*``, ``dead_fraction``, ...);
- per-epoch aggregates ``epoch_<agg>/<stat>/<param>`` with the epoch number as the step;
- weight histograms ``weights/<param>`` at the step they were recorded, with the stored fixed bins
  and counts exactly (the sum and sum of squares, which TensorBoard only uses for summaries, are
  estimated from the bin centres);
- stored images (blobs of kind ``image``) as images ``<section>/<name>``; stored tables, events and
  the layer table as markdown text.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bbdecoder.store.reader import RunReader, open_run

GRAD_STAT_NAMES = ("mean", "mean_abs", "max_abs", "var", "l1", "l2")


def scalar_tag(stat: str, param: str, layer: str) -> str:
    """The TensorBoard tag of one stored per-step statistic."""
    owner = "model" if param == "*" else (param or layer or "model")  # "*": the whole model
    return f"grad_{stat}/{owner}" if stat in GRAD_STAT_NAMES else f"{stat}/{owner}"


def _markdown(frame: pd.DataFrame, max_rows: int = 500) -> str:
    shown = frame.head(max_rows)
    head = "| " + " | ".join(str(c) for c in shown.columns) + " |"
    rule = "|" + "---|" * len(shown.columns)
    rows = [
        "| " + " | ".join(str(v).replace("|", "\\|") for v in r) + " |" for r in shown.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def export_tensorboard(run: str | Path | RunReader, log_dir: str | Path) -> Path:
    """Write the run's scalars, histograms, images and tables as TensorBoard event files in ``log_dir``
    (created); returns ``log_dir``. Needs the ``tensorboard`` package."""
    from bbdecoder.monitor.tensorboard import summary_writer

    reader = run if isinstance(run, RunReader) else open_run(run)
    out = Path(log_dir)
    writer = summary_writer(out)
    try:
        with reader.snapshot():
            _write_scalars(reader, writer)
            _write_histograms(reader, writer)
            _write_blobs(reader, writer)
            layers = reader.layers()
            if not layers.empty:
                writer.add_text("layers", _markdown(layers), 0)
            events = reader.events()
            for event in events.itertuples():
                step = int(event.step) if pd.notna(event.step) else 0
                writer.add_text(f"events/{event.kind}", str(event.message), step)
    finally:
        writer.close()
        if not isinstance(run, RunReader):
            reader.close()
    return out


def _write_scalars(reader: RunReader, writer: object) -> None:
    add = writer.add_scalar  # type: ignore[attr-defined]
    for row in reader.steps().dropna(subset=["loss"]).itertuples():
        add("loss", float(row.loss), int(row.step))
    scalars = reader.scalars().dropna(subset=["value"])
    for step, stat, param, layer, value in zip(
        scalars["step"], scalars["stat"], scalars["param"], scalars["layer"], scalars["value"], strict=True
    ):
        add(scalar_tag(stat, param, layer), float(value), int(step))
    epochs = reader.epoch_scalars().dropna(subset=["value"])
    for row in epochs.itertuples():
        owner = row.param or row.layer or "model"
        add(f"epoch_{row.agg}/{row.stat}/{owner}", float(row.value), int(row.epoch))


def _write_histograms(reader: RunReader, writer: object) -> None:
    hist = reader.histograms()
    if hist.empty:
        return
    for (step, kind, param, layer), group in hist.groupby(["step", "kind", "param", "layer"], sort=False):
        group = group.sort_values("bin")
        counts = group["count"].to_numpy(dtype=np.float64)
        left, right = group["left"].to_numpy(), group["right"].to_numpy()
        centres = (left + right) / 2
        # TensorBoard buckets are (previous limit, limit]: a leading empty bucket fixes the lower edge.
        limits = [float(left[0]), *map(float, right)]
        writer.add_histogram_raw(  # type: ignore[attr-defined]
            tag=f"{'weights' if kind == 'weight' else kind}/{param or layer}",
            min=float(left[0]),
            max=float(right[-1]),
            num=float(counts.sum()),
            sum=float((counts * centres).sum()),
            sum_squares=float((counts * centres**2).sum()),
            bucket_limits=limits,
            bucket_counts=[0.0, *map(float, counts)],
            global_step=int(step),
        )


def _write_blobs(reader: RunReader, writer: object) -> None:
    from PIL import Image

    records = reader.blobs()
    for record in records.itertuples():
        section = str(record.meta.get("section", "")) or record.kind
        tag = f"{section}/{record.name}"
        step = int(record.step) if pd.notna(record.step) else 0
        if record.kind == "image":
            with Image.open(io.BytesIO(reader.blob(record.blob_id))) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            writer.add_image(tag, pixels, step, dataformats="HWC")  # type: ignore[attr-defined]
        elif record.kind == "table":
            payload = json.loads(reader.blob(record.blob_id))
            frame = pd.DataFrame(payload["data"], columns=payload["columns"])
            writer.add_text(tag, _markdown(frame), step)  # type: ignore[attr-defined]


def export_csv(run: str | Path | RunReader, folder: str | Path) -> list[Path]:
    """Scalars, epoch aggregates, histograms, events and layers as CSV files in ``folder``."""
    reader = run if isinstance(run, RunReader) else open_run(run)
    try:
        return reader.to_csv(folder)
    finally:
        if not isinstance(run, RunReader):
            reader.close()


def export_parquet(run: str | Path | RunReader, folder: str | Path) -> list[Path]:
    """The same tables as Parquet files (needs ``pyarrow``; raises ImportError naming it otherwise)."""
    reader = run if isinstance(run, RunReader) else open_run(run)
    try:
        return reader.to_parquet(folder)
    finally:
        if not isinstance(run, RunReader):
            reader.close()
