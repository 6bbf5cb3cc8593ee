"""Figures that compare attribution methods on several images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from bbdecoder.viz.overlay import ArrayLike, overlay, to_numpy_image


def comparison_grid(
    images: ArrayLike,
    maps: Mapping[str, ArrayLike],
    *,
    titles: Sequence[str] | None = None,
    alpha: float = 0.5,
    signed: Sequence[str] = (),
    cell_size: float = 2.0,
) -> Figure:
    """A grid: one row per image, the image then one overlay per method (``maps[name]`` is (N, 1, H, W)).

    Methods listed in ``signed`` are drawn with a diverging colormap centred on zero.
    """
    n_images = len(images)
    for name, batch in maps.items():
        if len(batch) != n_images:
            raise ValueError(f"maps[{name!r}] has {len(batch)} maps for {n_images} images")
    columns = 1 + len(maps)
    figure, axes = plt.subplots(
        n_images, columns, figsize=(cell_size * columns, cell_size * n_images), squeeze=False
    )
    for row in range(n_images):
        axes[row][0].imshow(to_numpy_image(images[row]))
        axes[row][0].set_ylabel(titles[row] if titles else f"image {row}")
        for column, (name, batch) in enumerate(maps.items(), start=1):
            axes[row][column].imshow(overlay(images[row], batch[row], alpha=alpha, signed=name in signed))
            if row == 0:
                axes[row][column].set_title(name)
        if row == 0:
            axes[row][0].set_title("input")
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save ``figure`` as PNG (parents created) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
