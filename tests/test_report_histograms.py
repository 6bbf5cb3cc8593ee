"""The report's weight-histogram grid: every cell has the colour of log(1 + count) of its own panel
(checked pixel by pixel against the colormap), epochs run bottom to top, bins left to right, each
panel is titled and labelled, and the whole grid is one axes (not one per parameter)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib import image as mpimg
from matplotlib import pyplot as plt
from matplotlib.collections import QuadMesh
from matplotlib.colors import Normalize

from bbdecoder.report.figures import DPI, weight_histogram_figure, weight_histogram_grid

COUNTS = {
    "fc.weight": np.array([[0, 5, 40, 3], [1, 9, 30, 8], [2, 20, 20, 6]]),  # epochs x bins
    "fc.bias": np.array([[7, 0, 0, 0], [0, 7, 0, 0], [0, 0, 0, 7]]),
}
RANGES = {"fc.weight": (-0.3, 0.3), "fc.bias": (-4.0, 4.0)}


def hist_rows() -> pd.DataFrame:
    """The reader's ``histograms(kind="weight")`` columns, for epochs 0..2 and 4 fixed bins."""
    rows = []
    for param, counts in COUNTS.items():
        lo, hi = RANGES[param]
        edges = np.linspace(lo, hi, counts.shape[1] + 1)
        for epoch, line in enumerate(counts):
            for b, count in enumerate(line):
                rows.append(
                    (epoch * 10, epoch, 0, "fc", param, "weight", b, edges[b], edges[b + 1], int(count))
                )
    columns = ["step", "epoch", "layer_id", "layer", "param", "kind", "bin", "left", "right", "count"]
    return pd.DataFrame(rows, columns=columns)


def test_every_cell_has_the_colour_of_its_count() -> None:
    params = list(COUNTS)
    figure = weight_histogram_figure(hist_rows(), params, columns=2)
    try:
        (axis,) = figure.axes  # one axes for the whole grid
        meshes = [c for c in axis.collections if isinstance(c, QuadMesh)]
        assert len(meshes) == len(params)
        figure.canvas.draw()
        pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)  # type: ignore[attr-defined]
        height = pixels.shape[0]
        for mesh, param in zip(meshes, params, strict=True):
            expected = np.log1p(COUNTS[param].astype(float))
            colours = colormaps["viridis"](Normalize(expected.min(), expected.max())(expected))[..., :3]
            corners = mesh.get_coordinates()  # (epochs + 1, bins + 1, 2) in the axes' data units
            centres = (corners[:-1, :-1] + corners[1:, 1:]) / 2
            ys = []
            for e, b in np.ndindex(centres.shape[:2]):
                x, y = axis.transData.transform(centres[e, b])
                got = pixels[height - 1 - round(y), round(x)]
                assert np.abs(got - np.round(colours[e, b] * 255)).max() <= 2, (param, e, b)
                ys.append((e, y))
            # epoch 0 is the bottom row, the first bin the leftmost column
            assert min(ys, key=lambda t: t[1])[0] == 0 and max(ys, key=lambda t: t[1])[0] == 2
            assert np.all(np.diff(centres[0, :, 0]) > 0)
        texts = {t.get_text() for t in axis.texts}
        assert set(params) <= texts and "epoch" in texts
        assert {"-0.15", "0.00", "0.15"} <= texts  # weight values, as matplotlib's own axis labels them
        assert {"-4", "0", "4"} <= texts and {"0", "1", "2"} <= texts  # bias values; epochs
    finally:
        plt.close(figure)


def test_the_grid_png_has_the_figure_size_and_skips_unknown_parameters() -> None:
    png = weight_histogram_grid(hist_rows(), ["fc.weight", "fc.bias", "missing"], columns=2)
    image = mpimg.imread(io.BytesIO(png))
    assert image.shape[:2] == (round(2 * 2.2 * DPI), round(2 * 3.1 * DPI))  # 2 rows x 2 columns
    # the third panel's place (row 2, column 1) is blank: nothing was drawn for an unknown parameter
    blank = image[int(2.2 * DPI) + 10 :, : int(3.1 * DPI)]
    assert np.allclose(blank[..., :3], 1.0)
