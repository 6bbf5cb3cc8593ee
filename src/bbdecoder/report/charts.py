"""Interactive charts of the report and the live dashboard: JSON chart specs built from the store.

A chart spec is a plain dict that ``charts.js`` (shipped beside this module) draws with uPlot::

    {"id": str, "title": str, "kind": "lines" | "bars", "x": [...], "xlabel": str, "ylabel": str,
     "log": bool, "note": str, "categories": [str, ...] (bars only),
     "series": [{"label", "layer_id", "layer", "param", "stat", "values": [...]}, ...]}

Every series shares ``x``; missing and non-finite values are ``null`` (shown as gaps; the note says
how many were non-finite). Long series are downsampled here, on the server side, by
:func:`downsample_minmax`, which keeps each bucket's minimum and maximum so that a spike is never
averaged away.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from bbdecoder.store.reader import RunReader

MAX_POINTS = 1000
"""Default largest number of x positions per chart (two per bucket after downsampling)."""


@dataclass
class StatMatrix:
    """One statistic of many series as a dense matrix.

    Attributes:
        steps: (T,) the steps (or epochs) that hold a value of any series, ascending.
        values: (T, S) float64, NaN where a series has no value at that step.
        series: S dicts with ``layer_id``, ``layer``, ``param``.
        nonfinite: how many stored values were NaN or +-Inf (they are NaN in ``values``).
    """

    steps: np.ndarray
    values: np.ndarray
    series: list[dict[str, Any]]
    nonfinite: int = 0


def _rows(reader: RunReader, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    # The reader's own connection: the same (read-only, snapshot) view as the rest of the report.
    return reader._conn.execute(sql, params).fetchall()


def stat_matrix(
    reader: RunReader,
    stat: str,
    *,
    params_only: bool | None = None,
    epoch_max: int | None = None,
    by: str = "step",
) -> StatMatrix | None:
    """Every series' values of one per-step statistic ``stat`` (``None`` when the run has none).

    ``params_only=True`` keeps parameter series (gradients, update ratios), ``False`` keeps layer-output
    series (activations, ``param == ""``), ``None`` keeps both. ``by="epoch"`` puts the epoch on the x
    axis (for statistics recorded once per epoch; the last value of an epoch wins).
    """
    if by not in {"step", "epoch"}:
        raise ValueError(f"by must be 'step' or 'epoch', got {by!r}")
    found = _rows(reader, "SELECT stat_id FROM stat_names WHERE name = ?", (stat,))
    if not found:
        return None
    where = "s.stat_id = ?"
    args: list[object] = [found[0][0]]
    if params_only is True:
        where += " AND r.param != ''"
    elif params_only is False:
        where += " AND r.param = ''"
    if epoch_max is not None:
        where += " AND s.epoch <= ?"
        args.append(epoch_max)
    rows = _rows(
        reader,
        f"SELECT s.{by}, s.series_id, s.value FROM scalars s JOIN series r USING (series_id) WHERE {where} "
        "ORDER BY s.rowid",
        tuple(args),
    )
    if not rows:
        return None
    data = np.array([(r[0], r[1], math.nan if r[2] is None else r[2]) for r in rows], dtype=np.float64)
    return _dense(reader, data)


def epoch_stat_matrix(reader: RunReader, stat: str, agg: str = "mean") -> StatMatrix | None:
    """Like :func:`stat_matrix` for the per-epoch aggregates (``steps`` are epochs)."""
    rows = _rows(
        reader,
        "SELECT e.epoch, e.series_id, e.value FROM epoch_scalars e JOIN stat_names n USING (stat_id) "
        "JOIN series r USING (series_id) WHERE n.name = ? AND e.agg = ? AND r.param != ''",
        (stat, agg),
    )
    if not rows:
        return None
    data = np.array([(r[0], r[1], math.nan if r[2] is None else r[2]) for r in rows], dtype=np.float64)
    return _dense(reader, data)


def _dense(reader: RunReader, data: np.ndarray) -> StatMatrix:
    steps, step_index = np.unique(data[:, 0], return_inverse=True)
    series_ids, series_index = np.unique(data[:, 1].astype(np.int64), return_inverse=True)
    values = np.full((len(steps), len(series_ids)), np.nan)
    values[step_index, series_index] = data[:, 2]
    nonfinite = int((~np.isfinite(data[:, 2])).sum())
    values[~np.isfinite(values)] = np.nan
    names = {
        int(sid): (int(lid), str(layer or ""), str(param))
        for sid, lid, layer, param in _rows(
            reader,
            "SELECT r.series_id, r.layer_id, l.name, r.param FROM series r "
            "LEFT JOIN layers l ON l.layer_id = r.layer_id",
        )
    }
    series = []
    for sid in series_ids:
        lid, layer, param = names.get(int(sid), (-1, "", ""))
        series.append({"layer_id": lid, "layer": layer, "param": param})
    return StatMatrix(steps.astype(np.int64), values, series, nonfinite)


def downsample_minmax(
    x: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` rows of ``values`` (T, S) along x (T,), keeping extremes.

    The T rows are cut into ``max_points // 2`` contiguous buckets; each bucket becomes two rows, at
    its first and last x, holding for every series its bucket minimum and maximum in the order they
    occurred. So every series' global minimum and maximum survive, and a one-step spike still shows.
    NaN is ignored (a bucket of NaN only stays NaN). Returns ``(x_out, values_out)``.
    """
    t = len(x)
    if t <= max_points or max_points < 2:
        return x, values
    buckets = max_points // 2
    edges = np.linspace(0, t, buckets + 1).astype(np.int64)
    x_out = np.empty(2 * buckets, dtype=x.dtype)
    out = np.full((2 * buckets, values.shape[1]), np.nan)
    columns = np.arange(values.shape[1])
    for b in range(buckets):
        lo, hi = edges[b], edges[b + 1]
        chunk = values[lo:hi]
        x_out[2 * b], x_out[2 * b + 1] = x[lo], x[hi - 1]
        empty = np.isnan(chunk).all(axis=0)
        arg_min = np.where(np.isnan(chunk), np.inf, chunk).argmin(axis=0)
        arg_max = np.where(np.isnan(chunk), -np.inf, chunk).argmax(axis=0)
        first = np.minimum(arg_min, arg_max)
        second = np.maximum(arg_min, arg_max)
        out[2 * b] = np.where(empty, np.nan, chunk[first, columns])
        out[2 * b + 1] = np.where(empty, np.nan, chunk[second, columns])
    return x_out, out


def _clean(values: np.ndarray) -> list[float | None]:
    """JSON-safe values: 4-5 significant digits, ``None`` for NaN/Inf."""
    return [float(f"{v:.5g}") if math.isfinite(v) else None for v in values.tolist()]


def series_label(entry: dict[str, Any]) -> str:
    layer = f"[{entry['layer_id']}] {entry['layer']}" if entry["layer_id"] >= 0 else "model"
    return f"{layer} · {entry['param']}" if entry["param"] else layer


def line_chart(
    chart_id: str,
    title: str,
    matrix: StatMatrix,
    stat: str,
    *,
    xlabel: str = "step",
    ylabel: str = "",
    log: bool = False,
    note: str = "",
    max_points: int = MAX_POINTS,
    labels: list[str] | None = None,
    yrange: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A line chart spec of every series in ``matrix`` (downsampled to ``max_points`` x positions);
    ``yrange`` fixes the linear y range (fractions: ``(0, 1)``)."""
    x, values = downsample_minmax(matrix.steps, matrix.values, max_points)
    notes = [note] if note else []
    if len(x) < len(matrix.steps):
        per = math.ceil(len(matrix.steps) / (len(x) // 2))
        notes.append(
            f"{len(matrix.steps):,} {xlabel}s downsampled to {len(x):,} points: each pair of points is the "
            f"minimum and maximum of about {per} {xlabel}s, so extremes are kept."
        )
    if matrix.nonfinite:
        notes.append(f"{matrix.nonfinite} non-finite value(s) (NaN/Inf) are shown as gaps.")
    series = [
        {
            **entry,
            "label": labels[i] if labels is not None else series_label(entry),
            "stat": stat,
            "values": _clean(values[:, i]),
        }
        for i, entry in enumerate(matrix.series)
    ]
    return {
        "id": chart_id,
        "title": title,
        "kind": "lines",
        "x": [int(v) for v in x.tolist()],
        "xlabel": xlabel,
        "ylabel": ylabel or stat,
        "log": log,
        "note": " ".join(notes),
        "yrange": list(yrange) if yrange is not None else None,
        "series": series,
    }


def bar_chart(
    chart_id: str,
    title: str,
    categories: list[dict[str, Any]],
    bars: dict[str, np.ndarray],
    *,
    ylabel: str,
    log: bool = True,
    note: str = "",
) -> dict[str, Any]:
    """A bar chart spec: one bar group per category (layer/parameter), one series per ``bars`` entry."""
    return {
        "id": chart_id,
        "title": title,
        "kind": "bars",
        "x": list(range(len(categories))),
        "xlabel": "parameter",
        "ylabel": ylabel,
        "log": log,
        "note": note,
        "categories": [series_label(c) for c in categories],
        "category_info": [
            {"layer_id": c["layer_id"], "layer": c["layer"], "param": c["param"]} for c in categories
        ],
        "series": [
            {"label": name, "layer_id": -1, "layer": "", "param": "", "stat": name, "values": _clean(vals)}
            for name, vals in bars.items()
        ],
    }


def to_json(payload: Any) -> str:
    """JSON for a ``<script type="application/json">`` element (no ``</`` can close it early)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def asset(name: str) -> str:
    """The text of a file shipped with the report (``charts.js``, ``charts.css``, ``vendor/...``)."""
    return resources.files("bbdecoder.report").joinpath(name).read_text(encoding="utf-8")
