"""Intermediate features: capture a layer's output, draw it as a channel grid, animate it over epochs."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from torch import nn

from bbdecoder.hooks import HookManager, preserved_state


def capture_layer_output(model: nn.Module, inputs: Any, module: nn.Module, *, call: int = -1) -> Any:
    """The output of ``module`` when ``model(inputs)`` runs, detached (no grad, eval mode).

    The structure is kept as the layer returns it: a tensor, or a tuple/list/dict whose tensors are
    detached copies. ``call`` picks which call when the module runs several times (default: the
    last). The model's modes are restored, so BatchNorm statistics are not updated by looking.
    """
    outputs: list[Any] = []
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with preserved_state(model, eval_mode=True), HookManager() as hooks, torch.no_grad():
        hooks.forward_hook(module, lambda _m, _i, output: outputs.append(_detached(output)))
        model(*args)
    if not outputs:
        raise RuntimeError(f"the layer {type(module).__name__} did not run in the forward pass")
    return outputs[call]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {key: _detached(v) for key, v in value.items()}
    return value


def feature_grid(
    features: torch.Tensor | np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    max_channels: int = 64,
    cmap: str = "viridis",
    gap: int = 1,
) -> np.ndarray:
    """Tile a (C, H, W) feature map (or (C, L), drawn as one row per channel) into RGB uint8.

    ``vmin``/``vmax`` fix the colour scale (pass the same values for every epoch so that change is
    visible); by default the map's own range. Cells keep the map's aspect (non-square maps are fine);
    the grid has ``ceil(sqrt(C))`` columns.
    """
    values = (
        features.detach().cpu().double().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features, float)
    )
    if values.ndim == 2:
        values = values[:, None, :]
    if values.ndim != 3:
        raise ValueError(f"feature_grid needs (C, H, W) or (C, L) features, got shape {values.shape}")
    values = values[:max_channels]
    channels, height, width = values.shape
    low = float(np.nanmin(values)) if vmin is None else vmin
    high = float(np.nanmax(values)) if vmax is None else vmax
    scaled = np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)
    columns = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / columns)
    canvas = np.ones((rows * (height + gap) - gap, columns * (width + gap) - gap, 3))
    colormap = colormaps[cmap]
    for channel in range(channels):
        row, column = divmod(channel, columns)
        top, left = row * (height + gap), column * (width + gap)
        canvas[top : top + height, left : left + width] = colormap(scaled[channel])[..., :3]
    return (canvas * 255).round().astype(np.uint8)


def write_gif(frames: Sequence[np.ndarray], path: str | Path, *, fps: float = 5, scale: int = 1) -> Path:
    """An animated GIF, one frame per array (RGB uint8, all the same shape), looping forever."""
    from PIL import Image

    if not frames:
        raise ValueError("no frames to write: record features for at least one epoch first")
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"all frames must have the same shape, got {sorted(shapes)}")
    images = [Image.fromarray(frame) for frame in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, disposal=1
    )
    return path


def write_mp4(frames: Sequence[np.ndarray], path: str | Path, *, fps: float = 5) -> Path | None:
    """An MP4 through matplotlib's ffmpeg writer; ``None`` (nothing written) when ffmpeg is absent."""
    if shutil.which("ffmpeg") is None or not frames:
        return None
    from matplotlib import animation
    from matplotlib import pyplot as plt

    height, width = frames[0].shape[:2]
    figure = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.axis("off")
    image = axis.imshow(frames[0])
    path = Path(path)
    writer = animation.FFMpegWriter(fps=max(1, round(fps)))
    with writer.saving(figure, str(path), dpi=100):
        for frame in frames:
            image.set_data(frame)
            writer.grab_frame()
    plt.close(figure)
    return path


def small_multiples(frames: Sequence[np.ndarray], labels: Sequence[str], *, title: str = "") -> Any:
    """A static figure with one panel per frame (e.g. per epoch), for reports."""
    from matplotlib import pyplot as plt

    count = len(frames)
    if count == 0:
        raise ValueError("no frames to draw")
    columns = min(count, 6)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, frame, label in zip(axes.flat, frames, labels, strict=False):
        axis.imshow(frame)
        axis.set_title(label, fontsize=9)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
