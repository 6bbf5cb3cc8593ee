"""Report figures that combine many series into one picture (one render instead of dozens)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PANEL_W, PANEL_H = 3.1, 2.2  # inches per small multiple
LEFT, RIGHT, TOP, BOTTOM = 0.5, 0.12, 0.27, 0.3  # margins inside a panel: labels, title, ticks
TICK = 0.04
DPI = 90


def weight_histogram_figure(hist: pd.DataFrame, params: list[str], columns: int = 4) -> Figure:
    """Small multiples: for each parameter, its weight histogram per epoch as a heat map (rows: epochs,
    the first at the bottom; columns: the stored fixed bins; colour: log(1 + count), scaled per panel),
    titled with the parameter, with a few weight values on x and whole epochs on y.

    Drawn on one axes spanning the figure, in inches from the top left: one mesh per panel and a few
    texts and line collections, none of the tick and layout machinery of 24 separate axes (which
    took seconds to draw)."""
    rows = max(1, math.ceil(len(params) / columns))
    width, height = PANEL_W * columns, PANEL_H * rows
    figure = plt.figure(figsize=(width, height))
    axis = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axis.set_axis_off()
    axis.set_xlim(0.0, width)
    axis.set_ylim(height, 0.0)
    part = hist[hist["param"].isin(params)]
    counts = part.pivot_table(index=["param", "epoch"], columns="bin", values="count", aggfunc="last")
    lefts = part.groupby(["param", "bin"])["left"].first()
    rights = part.groupby("param")["right"].max()
    frames, ticks = [], []
    text: dict[str, Any] = {"fontsize": 6, "transform": axis.transData}
    for i, param in enumerate(params):
        if param not in rights.index:
            continue
        x0 = (i % columns) * PANEL_W + LEFT
        y0 = (i // columns) * PANEL_H + TOP
        w, h = PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM
        table = counts.loc[param].sort_index().dropna(axis=1, how="all")
        edges = np.append(lefts.loc[param].loc[table.columns].to_numpy(float), float(rights.loc[param]))
        epochs = table.index.to_numpy()
        epoch_edges = np.append(epochs - 0.5, epochs[-1] + 0.5)
        lo, hi = float(edges[0]), float(edges[-1])
        e_lo, e_hi = float(epoch_edges[0]), float(epoch_edges[-1])
        values = np.log1p(table.to_numpy(dtype=float))
        to_x = _linear(lo, hi, x0, x0 + w)
        to_y = _linear(e_lo, e_hi, y0 + h, y0)  # the first epoch at the bottom
        axis.pcolormesh(to_x(edges), to_y(epoch_edges), values, cmap="viridis", shading="flat")
        frames.append([(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h), (x0, y0)])
        axis.text(x0 + w / 2, y0 - 0.07, param, ha="center", va="bottom", **{**text, "fontsize": 8})
        # a few ticks only: at most 4 weight values on x, whole epochs on y (no overlapping labels)
        x_ticks = [v for v in MaxNLocator(nbins=4).tick_values(lo, hi) if lo <= v <= hi]
        for v, label in zip(x_ticks, _tick_labels(x_ticks), strict=True):
            x = float(to_x(np.array(v)))
            ticks.append([(x, y0 + h), (x, y0 + h + TICK)])
            axis.text(x, y0 + h + TICK + 0.03, label, ha="center", va="top", **text)
        y_locator = MaxNLocator(nbins=min(len(epochs), 5), integer=True)
        for e in (e for e in y_locator.tick_values(e_lo, e_hi) if e_lo <= e <= e_hi):
            y = float(to_y(np.array(e)))
            ticks.append([(x0 - TICK, y), (x0, y)])
            axis.text(x0 - TICK - 0.03, y, f"{round(e)}", ha="right", va="center", **text)
        axis.text(x0 - 0.32, y0 + h / 2, "epoch", ha="center", va="center", rotation=90, **text)
    axis.add_collection(LineCollection(frames, colors="black", linewidths=0.8))
    axis.add_collection(LineCollection(ticks, colors="black", linewidths=0.6))
    return figure


def _linear(lo: float, hi: float, start: float, stop: float) -> Callable[[np.ndarray], np.ndarray]:
    """The map taking ``[lo, hi]`` onto ``[start, stop]``."""
    scale = (stop - start) / ((hi - lo) or 1.0)
    return lambda v: start + (np.asarray(v, dtype=float) - lo) * scale


def _tick_labels(values: list[float]) -> list[str]:
    """Labels with as many decimals as the tick step needs (``-0.25 0.00 0.25``, ``-4 0 4``)."""
    if len(values) < 2:
        return [f"{v:.3g}" for v in values]
    step = abs(values[1] - values[0])
    if step < 1e-3 or max(abs(v) for v in values) >= 1e5:
        return [f"{v:.2g}" for v in values]
    decimals = len(f"{step:.6f}".rstrip("0").split(".")[1])
    return [f"{v:.{decimals}f}".replace("-0." + "0" * decimals, "0." + "0" * decimals) for v in values]


def weight_histogram_grid(hist: pd.DataFrame, params: list[str], columns: int = 4) -> bytes:
    """The PNG bytes of :func:`weight_histogram_figure` (``hist``: the reader's ``histograms()`` rows)."""
    figure = weight_histogram_figure(hist, params, columns)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    plt.close(figure)
    return buffer.getvalue()
