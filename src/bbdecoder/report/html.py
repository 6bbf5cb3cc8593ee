"""Small HTML building blocks for the self-contained report (no scripts, no external resources)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    """(text, is_numeric) for one table cell: floats with 4 significant digits, NaN shown as NaN."""
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, int):
        return f"{value:,}", True
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN", True
        return f"{value:.4g}", True
    if value is None:
        return "", False
    return str(value), False


def table(frame: pd.DataFrame, caption: str = "", max_rows: int = 200) -> str:
    """An HTML table of ``frame`` (index dropped); longer frames are cut at ``max_rows`` with a note."""
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
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{cut}"


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole document."""
    nav = "".join(f'<a href="#{esc(s.key)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{esc(s.key)}" class="{"failed" if s.failed else ""}"><h2>{esc(s.title)}</h2>'
        f"{s.body}</section>"
        for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
