"""Small HTML building blocks for the self-contained report (no external resources: the chart library
and its data are inlined)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #c5cad6; font-size: 13px; }
nav { padding: 10px 32px; background: #e9ecf2; font-size: 13px; }
nav a { margin-right: 14px; color: #2b4c9a; text-decoration: none; }
main { padding: 8px 32px 40px 32px; max-width: 1200px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 14px 20px;
          margin: 16px 0; }
section h2 { margin-top: 0; font-size: 18px; }
figure { margin: 10px 0 18px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceef2; }
figcaption { font-size: 12px; color: #555d6e; margin-top: 4px; }
table { border-collapse: collapse; font-size: 12.5px; margin: 8px 0 14px 0; }
th, td { border: 1px solid #dde1e8; padding: 3px 8px; text-align: right; }
th { background: #f0f2f6; }
td.text, th.text { text-align: left; }
.note { color: #555d6e; font-size: 13px; }
.failed { background: #fff3f0; border-color: #e9a89a; }
"""


@dataclass
class Section:
    """One part of the report: ``key`` (anchor), ``title`` and its HTML ``body``."""

    key: str
    title: str
    body: str
    failed: bool = False


def esc(text: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def paragraph(text: str, css: str = "note") -> str:
    return f'<p class="{css}">{esc(text)}</p>'


def image(png: bytes, alt: str, caption: str = "") -> str:
    """A figure with the PNG embedded as a data URI."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">{cap}</figure>'


def _cell(value: object) -> tuple[str, bool]:
    """(text, is_numeric) for one table cell: floats with 4 significant digits; NaN and +-Inf are
    shown as NaN (a table that had an infinite value says why under it, see :func:`table`)."""
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        if not math.isfinite(value):
            return "NaN", True
        return f"{value:.4g}", True
    if value is None:
        return "", False
    return str(value), False


def _has_infinite(frame: pd.DataFrame) -> bool:
    numeric = frame.select_dtypes(include="number")
    return bool(numeric.size) and bool(np.isinf(numeric.to_numpy(dtype=float)).any())


def table(
    frame: pd.DataFrame,
    caption: str = "",
    max_rows: int = 200,
    infinite_note: str = "NaN: the value was infinite (a division by zero).",
) -> str:
    """An HTML table of ``frame`` (index dropped); longer frames are cut at ``max_rows`` with a note.
    Infinite values are shown as NaN, with ``infinite_note`` under the table."""
    shown = frame.head(max_rows)
    head = "".join(f'<th class="text">{esc(c)}</th>' for c in shown.columns)
    rows = []
    for record in shown.itertuples(index=False, name=None):
        cells = []
        for value in record:
            item = value.item() if hasattr(value, "item") else value
            text, numeric = _cell(item)
            cells.append(f"<td>{esc(text)}</td>" if numeric else f'<td class="text">{esc(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cut = paragraph(f"first {max_rows} of {len(frame)} rows shown") if len(frame) > max_rows else ""
    if infinite_note and _has_infinite(shown):
        cut += paragraph(infinite_note)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{cut}"


def chart(chart_id: str) -> str:
    """The placeholder an interactive chart (spec ``chart_id`` in the page's payload) is drawn into."""
    return f'<div class="bbd-chart" data-chart="{esc(chart_id)}"></div>'


def _scripts(payload: dict[str, Any]) -> tuple[str, str]:
    """(styles, scripts): uPlot, the chart code and the JSON payload, all inline."""
    from bbdecoder.report.charts import asset, to_json

    styles = asset("vendor/uPlot.min.css") + asset("charts.css")
    scripts = (
        f'<script type="application/json" id="bbd-payload">{to_json(payload)}</script>'
        f"<script>{asset('vendor/uPlot.iife.min.js')}</script><script>{asset('charts.js')}</script>"
    )
    return styles, scripts


def page(
    title: str,
    subtitle: str,
    sections: Sequence[Section],
    payload: dict[str, Any] | None = None,
    header_extra: str = "",
) -> str:
    """The whole document. ``payload`` (chart specs, latest step, alerts, live settings) is inlined
    with the chart library; ``header_extra`` is HTML added to the header (the run picker)."""
    nav = "".join(f'<a href="#{esc(s.key)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.key)}" class="{"failed" if s.failed else ""}"><h2>{esc(s.title)}</h2>'
        f"{s.body}</section>"
        for s in sections
    )
    styles, scripts = _scripts(payload) if payload is not None else ("", "")
    latest = payload.get("latest_step") if payload is not None else None
    live = payload is not None and bool(payload.get("live"))
    status = '<span id="bbd-live-status" class="bbd-live">live</span> · ' if live else ""
    step_line = (
        f'<p class="bbd-live">{status}latest step: <span id="latest-step">'
        f"{'none' if latest is None else esc(latest)}</span></p>"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{STYLE}{styles}</style></head>"
        f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p>{step_line}{header_extra}</header>"
        f"<nav>{nav}</nav><main>{body}</main>{scripts}</body></html>\n"
    )
