"""Overlays and comparison grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from bbdecoder.viz import colorize, comparison_grid, overlay, save_figure


def test_overlay_shape_dtype_and_alpha_extremes() -> None:
    image = torch.rand(3, 10, 12)
    saliency = torch.rand(1, 1, 5, 6)  # lower resolution: resized to the image
    blended = overlay(image, saliency, alpha=0.4)
    assert blended.shape == (10, 12, 3) and blended.dtype == np.uint8
    only_image = overlay(image, saliency, alpha=0.0)
    expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_array_equal(
        only_image, np.round(expected.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    )
    only_map = overlay(image, saliency, alpha=1.0)
    heat = colorize(saliency, size=(10, 12))
    np.testing.assert_array_equal(only_map, np.round(heat * 255).astype(np.uint8))


def test_all_zero_and_non_finite_maps_are_safe() -> None:
    image = np.random.default_rng(0).random((8, 8))
    for saliency in (np.zeros((8, 8)), np.full((8, 8), np.nan)):
        picture = overlay(image, saliency)
        assert picture.shape == (8, 8, 3)
        zero_colour = np.round(colormaps["jet"](0.0)[:3] * np.ones((8, 8, 3)) * 255)
        np.testing.assert_array_equal(overlay(image, saliency, alpha=1.0), zero_colour.astype(np.uint8))


def test_percentile_clipping_and_signed_colours() -> None:
    values = np.linspace(0, 1, 100).reshape(10, 10)
    values[0, 0] = 1000.0  # one outlier must not wash the map out
    heat = colorize(values, clip_percentile=95)
    jet = colormaps["jet"]
    low, high = values.min(), np.percentile(values, 95)
    np.testing.assert_allclose(heat[5, 5], jet(min((values[5, 5] - low) / (high - low), 1.0))[:3])
    np.testing.assert_allclose(heat[0, 0], jet(1.0)[:3])  # the outlier is clipped, not the rest
    signed = colorize(np.array([[1.0, -1.0], [0.0, 0.0]]), signed=True, clip_percentile=100)
    assert signed[0, 0, 0] > signed[0, 0, 2]  # positive: red
    assert signed[0, 1, 2] > signed[0, 1, 0]  # negative: blue


def test_bad_shapes_are_reported() -> None:
    with pytest.raises(ValueError, match="one channel"):
        overlay(np.zeros((8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((8, 8)), np.zeros((8, 8)), alpha=2)


def test_comparison_grid_png(tmp_path) -> None:
    images = torch.rand(3, 1, 8, 8)
    maps = {"FullGrad": torch.rand(3, 1, 8, 8), "Gradient": torch.randn(3, 1, 8, 8)}
    figure = comparison_grid(images, maps, signed=["Gradient"])
    assert len(figure.axes) == 9
    path = save_figure(figure, tmp_path / "sub" / "grid.png")
    with Image.open(path) as picture:
        assert picture.size == (660, 660)  # 3 x 3 cells of 2 inches at 110 dpi
    with pytest.raises(ValueError, match="2 maps for 3 images"):
        comparison_grid(images, {"x": torch.rand(2, 1, 8, 8)})
