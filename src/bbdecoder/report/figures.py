"""Report figures that combine many series into one picture (one render instead of dozens)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.ticker import MaxNLocator

from bbdecoder.report.blobs import figure_png


def weight_histogram_grid(hist: pd.DataFrame, params: list[str], columns: int = 4) -> bytes:
    """Small multiples: for each parameter, its weight histogram per epoch as a heat map (epoch x
    weight value, log(1 + count)), from the stored fixed bins. Returns PNG bytes."""
    rows = math.ceil(len(params) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 2.2 * rows), squeeze=False)
    for axis, param in zip(axes.flat, params, strict=False):
        part = hist[hist["param"] == param]
        counts = part.pivot_table(index="epoch", columns="bin", values="count", aggfunc="last").sort_index()
        edges = np.append(part.groupby("bin")["left"].first().to_numpy(), part["right"].max())
        epochs = counts.index.to_numpy()
        rows_edges = np.append(epochs - 0.5, epochs[-1] + 0.5)
        axis.pcolormesh(edges, rows_edges, np.log1p(counts.to_numpy(dtype=float)), cmap="viridis")
        axis.set_title(param, fontsize=8)
        axis.tick_params(labelsize=6)
        # a few ticks only: whole epochs on y, at most 4 weight values on x (no overlapping labels)
        axis.yaxis.set_major_locator(MaxNLocator(nbins=min(len(epochs), 5), integer=True))
        axis.xaxis.set_major_locator(MaxNLocator(nbins=4))
        axis.set_ylabel("epoch", fontsize=6)
    for axis in list(axes.flat)[len(params) :]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure_png(figure, dpi=90)
