"""Build the self-contained HTML report of a run from its run store alone."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bbdecoder.report import html
from bbdecoder.report.charts import MAX_POINTS
from bbdecoder.report.sections import SECTIONS, BlobSection, ReportContext, SectionBuilder, alert_rows
from bbdecoder.store.reader import RunReader, open_run
from bbdecoder.store.writer import db_path

REPORT_FILENAME = "report.html"


class ReportSectionWarning(RuntimeWarning):
    """A report section failed; the report shows the error in its place."""


def build_report(
    run: str | Path | RunReader,
    out: str | Path | None = None,
    *,
    sections: Sequence[SectionBuilder] | None = None,
    title: str | None = None,
    max_points: int = MAX_POINTS,
) -> Path:
    """Write one self-contained HTML file for ``run``: interactive charts (uPlot and the data inlined),
    images embedded as data URIs, nothing fetched from the network when it is viewed.

    Args:
        run: the run folder (holding ``run.sqlite``), the ``.sqlite`` file, or an open reader.
        out: the HTML file to write; default ``report.html`` next to the store.
        sections: section functions in page order (default :data:`bbdecoder.report.SECTIONS`);
            sections without data are left out. A section that raises is shown as an error box
            (and warned about with :class:`ReportSectionWarning`); the others still render.
        title: page title (default: "bbdecoder run: <folder name>").
        max_points: largest number of x positions per chart; longer series are downsampled keeping
            each bucket's minimum and maximum.

    Returns:
        The path of the written file. It is written to a temporary file in the same folder and moved
        into place atomically (``os.replace``): a ``report.html`` that is a symlink is replaced, never
        followed, so a received run folder cannot make the report overwrite a file elsewhere.
    """
    reader = run if isinstance(run, RunReader) else open_run(run)
    try:
        target = Path(out) if out is not None else reader.path.parent / REPORT_FILENAME
        text = render_report(reader, sections=sections, title=title, max_points=max_points)
    finally:
        if not isinstance(run, RunReader):
            reader.close()
    write_atomically(target, text.encode("utf-8"))
    return target


def collect(
    reader: RunReader,
    *,
    sections: Sequence[SectionBuilder] | None = None,
    max_points: int = MAX_POINTS,
) -> tuple[list[html.Section], dict[str, Any]]:
    """Render every section of ``reader``'s run in one consistent snapshot; returns the sections and
    the page payload (``charts``, ``latest_step``, ``alerts``, ``live``: None)."""
    builders = list(SECTIONS if sections is None else sections)
    claimed = {"summary"} | {b.key for b in builders if isinstance(b, BlobSection)}
    rendered: list[html.Section] = []
    with tempfile.TemporaryDirectory(prefix="bbdecoder-report-") as scratch, reader.snapshot():
        context = ReportContext(reader, Path(scratch), claimed, max_points=max_points)
        for builder in builders:
            name = getattr(builder, "__name__", type(builder).__name__)
            try:
                section = builder(context)
            except Exception as err:
                warnings.warn(f"report section {name} failed: {err}", ReportSectionWarning, stacklevel=3)
                detail = "".join(traceback.format_exception_only(type(err), err))
                section = html.Section(
                    f"failed-{name}", f"{name} (failed)", f"<pre>{html.esc(detail)}</pre>", failed=True
                )
            if section is not None:
                rendered.append(section)
        steps = context.steps
        payload: dict[str, Any] = {
            "charts": context.charts,
            "latest_step": None if steps.empty else int(steps["step"].max()),
            "alerts": alert_rows(context.events),
            "live": None,
        }
    return rendered, payload


def render_report(
    reader: RunReader,
    *,
    sections: Sequence[SectionBuilder] | None = None,
    title: str | None = None,
    max_points: int = MAX_POINTS,
    live: dict[str, Any] | None = None,
    header_extra: str = "",
) -> str:
    """The report page as a string (what :func:`build_report` writes). ``live`` (``{"url": ...,
    "interval_ms": ...}``) makes the page poll that URL for new payloads (the dashboard)."""
    rendered, payload = collect(reader, sections=sections, max_points=max_points)
    payload["live"] = live
    store = reader.path
    heading = title or f"bbdecoder run: {store.parent.name or store.name}"
    built = "served live" if live else f"report built {time.strftime('%Y-%m-%d %H:%M:%S')}"
    subtitle = f"store {db_path(store).name} · {built}"
    return html.page(heading, subtitle, rendered, payload, header_extra=header_extra)


def write_atomically(target: Path, data: bytes) -> None:
    """Write ``data`` to a new file next to ``target``, then rename it over ``target``.

    The temporary file is created exclusively and without following links (``O_EXCL |
    O_NOFOLLOW``), with the usual permissions (0o666 less the umask); the rename replaces whatever
    ``target`` is, a symlink included, without writing through it. Raises ``OSError`` (e.g.
    ``IsADirectoryError`` when ``target`` is a folder); no temporary file is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temporary, flags, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
