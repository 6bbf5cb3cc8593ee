"""Put report material into the run store, and read it back: PNG images and JSON tables as blobs.

Every record carries ``meta["section"]`` (which report section shows it) and optionally
``meta["caption"]``; the report shows the latest record of each (section, name).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from bbdecoder.store.reader import RunReader
from bbdecoder.store.vocabulary import IMAGE_BLOB, TABLE_BLOB
from bbdecoder.store.writer import RunWriter

IMAGE_KIND = IMAGE_BLOB
TABLE_KIND = TABLE_BLOB


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """The PNG bytes of a matplotlib figure (the figure is closed)."""
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def store_image(
    writer: RunWriter,
    name: str,
    image: bytes | Figure,
    *,
    section: str,
    caption: str = "",
    step: int | None = None,
    epoch: int | None = None,
) -> int:
    """Store a PNG (bytes, or a matplotlib figure rendered now) for the report section ``section``;
    returns the blob id."""
    data = figure_png(image) if isinstance(image, Figure) else bytes(image)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"image {name!r} is not PNG data; pass PNG bytes or a matplotlib Figure")
    meta = {"section": section, "caption": caption, "format": "png"}
    return writer.add_blob(IMAGE_KIND, name, data, step=step, epoch=epoch, meta=meta)


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def store_table(
    writer: RunWriter,
    name: str,
    table: pd.DataFrame,
    *,
    section: str,
    caption: str = "",
    step: int | None = None,
    epoch: int | None = None,
) -> int:
    """Store a table as JSON (``{"columns": [...], "data": [[...], ...]}``; NaN becomes null) for the
    report section ``section``; returns the blob id."""
    payload = {
        "columns": [str(c) for c in table.columns],
        "data": [[_json_value(v) for v in row] for row in table.itertuples(index=False, name=None)],
    }
    meta = {"section": section, "caption": caption, "format": "json-table"}
    data = json.dumps(payload).encode()
    return writer.add_blob(TABLE_KIND, name, data, step=step, epoch=epoch, meta=meta)


def read_table(reader: RunReader, blob_id: int) -> pd.DataFrame:
    """A table stored with :func:`store_table` (null comes back as NaN in numeric columns)."""
    payload = json.loads(reader.blob(blob_id))
    frame = pd.DataFrame(payload["data"], columns=payload["columns"])
    return frame.infer_objects()


def latest_records(reader: RunReader, kind: str, section: str | None = None) -> pd.DataFrame:
    """Blob records of ``kind`` (``"image"`` or ``"table"``), the latest per (section, name), in the
    order they were first written; ``section`` restricts to one section. Columns as
    :meth:`RunReader.blobs` plus ``section`` and ``caption``."""
    records = reader.blobs(kind=kind)
    if records.empty:
        return records.assign(section=[], caption=[])
    records = records.assign(
        section=[str(m.get("section", "")) for m in records["meta"]],
        caption=[str(m.get("caption", "")) for m in records["meta"]],
    )
    if section is not None:
        records = records[records["section"] == section]
    first = records.groupby(["section", "name"], sort=False)["blob_id"].transform("min")
    latest = records.groupby(["section", "name"], sort=False)["blob_id"].transform("max")
    chosen = records[records["blob_id"] == latest].assign(_order=first[records["blob_id"] == latest])
    return chosen.sort_values("_order").drop(columns="_order").reset_index(drop=True)
