"""Pure functions that turn a map and an image into RGB uint8 pictures."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from torch.nn import functional as F

ArrayLike = Any  # torch.Tensor or numpy array


def to_numpy_image(image: ArrayLike) -> np.ndarray:
    """An image as float (H, W, 3) in [0, 1]; accepts (C, H, W), (H, W, C) or (H, W), any range."""
    array = (
        image.detach().cpu().double().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, dtype=float)
    )
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"cannot read an image of shape {np.shape(image)}; expected (C,H,W), (H,W,C) or (H,W)"
        )
    low, high = np.nanmin(array), np.nanmax(array)
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def to_numpy_map(saliency: ArrayLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A map as float (H, W); (1, 1, H, W), (1, H, W) and (H, W) accepted, resized bilinearly to ``size``."""
    tensor = (
        saliency.detach().cpu().double()
        if isinstance(saliency, torch.Tensor)
        else torch.as_tensor(np.asarray(saliency, dtype=float))
    )
    tensor = tensor.squeeze()
    if tensor.dim() != 2:
        raise ValueError(f"a saliency map must have one channel, got shape {tuple(saliency.shape)}")
    if size is not None and tuple(tensor.shape) != tuple(size):
        tensor = F.interpolate(tensor[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return tensor.numpy()


def colorize(
    saliency: ArrayLike,
    *,
    cmap: str | None = None,
    clip_percentile: float = 99.0,
    signed: bool = False,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Colour a map: RGB float (H, W, 3) in [0, 1].

    Absolute maps show ``|s|`` stretched from its minimum to its ``clip_percentile`` percentile (default
    colormap ``jet``), so a map with a large constant offset (FullGrad sums several scaled maps) still
    uses the whole colour range;
    signed maps are centred on zero, scaled by the percentile of ``|s|`` (default ``RdBu_r``: red
    positive, blue negative). An all-zero map colours as the colormap's zero, never NaN.
    """
    values = to_numpy_map(saliency, size)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    magnitude = np.abs(values)
    scale = float(np.percentile(magnitude, clip_percentile)) if magnitude.size else 0.0
    if scale <= 0:
        scale = float(magnitude.max()) or 1.0
    if signed:
        normalised = np.clip(values / scale, -1, 1) * 0.5 + 0.5
        colormap = colormaps[cmap or "RdBu_r"]
    else:
        low = float(magnitude.min()) if magnitude.size else 0.0
        span = scale - low if scale > low else (float(magnitude.max()) - low) or 1.0
        normalised = np.clip((magnitude - low) / span, 0, 1)
        colormap = colormaps[cmap or "jet"]
    return colormap(normalised)[..., :3]


def overlay(
    image: ArrayLike,
    saliency: ArrayLike,
    *,
    cmap: str | None = None,
    alpha: float = 0.5,
    clip_percentile: float = 99.0,
    signed: bool = False,
) -> np.ndarray:
    """Blend a coloured map over an image: uint8 RGB (H, W, 3) at the image's resolution.

    ``alpha`` is the weight of the map (0 = image only, 1 = map only).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = to_numpy_image(image)
    heat = colorize(saliency, cmap=cmap, clip_percentile=clip_percentile, signed=signed, size=base.shape[:2])
    blended = (1 - alpha) * base + alpha * heat
    return np.clip(np.round(blended * 255), 0, 255).astype(np.uint8)
