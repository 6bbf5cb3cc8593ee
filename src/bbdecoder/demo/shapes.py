"""A procedurally generated image set with ground-truth object masks, and a small CNN for it.

Each RGB image (64 x 64 by default) holds one object of a shape class

    0 disc, 1 square, 2 triangle, 3 cross

at a random place, size and rotation, filled with a random texture (stripes, checks or dots) in a
jittered colour, on a cluttered background: a smooth random colour field, distractor strokes in the
same palette as the objects, and pixel noise. The object's mask is returned with every image, so a
saliency map can be scored against exactly the pixels of the object (:mod:`bbdecoder.demo.localization`).
The strokes put strong edges outside the object, so an edge detector is not a good explanation.

Everything is numpy, vectorised over the batch and seeded: a few thousand images take a fraction of
a second.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CLASSES = ("disc", "square", "triangle", "cross")
TEXTURES = ("stripes", "checks", "dots", "solid")  # the class cue of CLASSES[i] is TEXTURES[i]
IMAGE_SIZE = 64


@dataclass
class ShapesData:
    """Images (N, 3, S, S) float32 in [0, 1], labels (N,) int64 (index into :data:`CLASSES`), object
    masks (N, S, S) bool, and each object's placement: ``centres`` (N, 2) as (y, x) in pixels (pixel
    centres at k + 0.5), ``radii`` (N,) in pixels, ``angles`` (N,) in radians."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    centres: torch.Tensor
    radii: torch.Tensor
    angles: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: slice | torch.Tensor) -> ShapesData:
        return ShapesData(
            self.images[index],
            self.labels[index],
            self.masks[index],
            self.centres[index],
            self.radii[index],
            self.angles[index],
        )


def _interpolation_matrix(size: int, knots: int) -> np.ndarray:
    """(size, knots) linear interpolation weights from a coarse grid of ``knots`` to ``size`` pixels."""
    position = np.linspace(0, knots - 1, size)
    low = np.minimum(np.floor(position).astype(int), knots - 2)
    frac = position - low
    weights = np.zeros((size, knots))
    weights[np.arange(size), low] = 1 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def _shape_masks(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-tests in the object's own frame (u, v scaled so the shape's outer radius is about 1),
    each class's test run only on its own images."""
    masks = np.zeros(u.shape, dtype=bool)
    for label in range(len(CLASSES)):
        rows = np.flatnonzero(labels == label)
        uu, vv = np.abs(u[rows]), np.abs(v[rows])
        if label == 0:  # disc
            inside = uu * uu + vv * vv <= 1.0
        elif label == 1:  # square
            inside = np.maximum(uu, vv) <= 0.78
        elif label == 2:  # equilateral triangle, inradius 0.55, one vertex up in its frame
            vs = v[rows]
            inside = (-vs <= 0.55) & (0.866 * uu + 0.5 * vs <= 0.55)
        else:  # cross, arms 0.32 wide
            inside = ((uu <= 0.32) & (vv <= 1.0)) | ((vv <= 0.32) & (uu <= 1.0))
        masks[rows] = inside
    return masks


def _sin_plane(a: np.ndarray, b: np.ndarray, c: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``sin(a x + b y + c)`` on the pixel grid, (N, S, S) for per-image coefficients (N,), computed
    separably (sin(p + q) = sin p cos q + cos p sin q): trigonometry only on (N, S) vectors."""
    px = a[:, None] * grid[None, :] + c[:, None]
    qy = b[:, None] * grid[None, :]
    return np.sin(qy)[:, :, None] * np.cos(px)[:, None, :] + np.cos(qy)[:, :, None] * np.sin(px)[:, None, :]


def _textures(
    rng: np.random.Generator,
    labels: np.ndarray,
    frame: tuple[np.ndarray, ...],
    grid: np.ndarray,
    texture_cue: float,
) -> np.ndarray:
    """(N, S, S) texture in [0.45, 1]: stripes at a random angle, checks, dots (random frequency) or
    solid. With probability ``texture_cue`` an object wears its class's own texture (:data:`TEXTURES`),
    else a random one: the texture is a second, local cue to the class, inside the object.

    ``frame`` = (cos, sin, cx, cy, radius) per image: the object's coordinates are
    u = (cos (x - cx) + sin (y - cy)) / radius and v = (cos (y - cy) - sin (x - cx)) / radius, so every
    pattern is a product of sines of planes in (x, y), each computed separably."""
    n = len(labels)
    own = rng.random(n) < texture_cue
    kind = np.where(own, labels % len(TEXTURES), rng.integers(0, len(TEXTURES), n))
    freq = (np.pi * rng.uniform(2.5, 4.5, n)).astype(np.float32) / frame[4]
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    angle = rng.uniform(0, np.pi, n).astype(np.float32)
    pattern = np.empty((n, len(grid), len(grid)), dtype=np.float32)
    pattern[kind == 3] = 1.0  # solid
    for k in range(3):
        rows = np.flatnonzero(kind == k)
        cos, sin, cx, cy, _ = (f[rows] for f in frame)
        f, p, a = freq[rows], phase[rows], angle[rows]

        def plane(
            cu: np.ndarray, cv: np.ndarray, shift: np.ndarray, rows_frame: tuple = (f, cos, sin, cx, cy)
        ) -> np.ndarray:
            # sin(f (cu u + cv v) + shift), with u and v written out in x and y
            ff, cs, sn, x0, y0 = rows_frame
            ax = ff * (cu * cs - cv * sn)
            by = ff * (cu * sn + cv * cs)
            return _sin_plane(ax, by, shift - ax * x0 - by * y0, grid)

        one, zero = np.ones(len(rows), np.float32), np.zeros(len(rows), np.float32)
        if k == 0:  # stripes
            pattern[rows] = 0.5 + 0.5 * plane(np.cos(a), np.sin(a), p)
        elif k == 1:  # checks
            pattern[rows] = 0.5 + 0.5 * np.sign(plane(one, zero, p) * plane(zero, one, zero))
        elif k == 2:  # dots
            quarter = np.float32(np.pi / 2)
            pattern[rows] = 0.5 + 0.5 * plane(one, zero, p + quarter) * plane(zero, one, zero + quarter)
    return 0.45 + 0.55 * pattern


def _palette(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Saturated random colours (``shape`` + (3,)) in [0, 1], one channel high, one low, one random."""
    colours = rng.uniform(0.0, 1.0, (*shape, 3))
    order = rng.permuted(np.tile(np.arange(3), (*shape, 1)), axis=-1)
    high = np.take_along_axis(colours, order[..., :1], -1) * 0.25 + 0.75
    low = np.take_along_axis(colours, order[..., 1:2], -1) * 0.25
    np.put_along_axis(colours, order[..., :1], high, -1)
    np.put_along_axis(colours, order[..., 1:2], low, -1)
    return colours


def make_shapes_data(
    n: int,
    *,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    n_strokes: int = 4,
    noise: float = 0.06,
    texture_cue: float = 0.9,
) -> ShapesData:
    """``n`` images of textured shapes on cluttered backgrounds, with their object masks.

    Args:
        n: number of images (classes balanced in expectation).
        seed: fixes everything (classes, placement, textures, colours, clutter, noise).
        size: image side in pixels (>= 32).
        n_strokes: distractor strokes per image.
        noise: standard deviation of the per-pixel (uniform) noise.
        texture_cue: probability that an object wears its class's texture (else a random one).

    Returns:
        :class:`ShapesData`; the same arguments give bit-identical data.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if n_strokes < 0:
        raise ValueError(f"n_strokes must be >= 0, got {n_strokes}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    scale = size / IMAGE_SIZE
    radius = (rng.uniform(12.0, 18.0, n) * scale).astype(np.float32)
    cy = rng.uniform(radius + 1, size - radius - 1).astype(np.float32)
    cx = rng.uniform(radius + 1, size - radius - 1).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    cos, sin = np.cos(theta), np.sin(theta)
    grid = np.arange(size, dtype=np.float32) + np.float32(0.5)
    dy = ((grid[None, :] - cy[:, None]) / radius[:, None])[:, :, None]
    dx = ((grid[None, :] - cx[:, None]) / radius[:, None])[:, None, :]
    u = cos[:, None, None] * dx + sin[:, None, None] * dy
    v = cos[:, None, None] * dy - sin[:, None, None] * dx
    masks = _shape_masks(labels, u, v)
    texture = _textures(rng, labels, (cos, sin, cx, cy, radius), grid, texture_cue)

    # Background: a smooth colour field from a coarse 5 x 5 grid, muted towards grey.
    knots = 5
    coarse = rng.uniform(0.15, 0.65, (n, 3, knots, knots)).astype(np.float32)
    w = _interpolation_matrix(size, knots).astype(np.float32)
    images = w @ coarse @ w.T

    # Distractor strokes in the objects' palette, 1 or 2 pixels wide, drawn as dense points.
    if n_strokes:
        colour = _palette(rng, (n, n_strokes)).astype(np.float32)
        ends = rng.uniform(0, size, (n, n_strokes, 2, 2)).astype(np.float32)
        thick = rng.random((n, n_strokes)) < 0.5
        t = np.linspace(0, 1, 2 * size, dtype=np.float32)
        ys = ends[:, :, 0, 0, None] + t * (ends[:, :, 1, 0, None] - ends[:, :, 0, 0, None])
        xs = ends[:, :, 0, 1, None] + t * (ends[:, :, 1, 1, None] - ends[:, :, 0, 1, None])
        image_index = np.broadcast_to(np.arange(n)[:, None, None], ys.shape)
        stroke_colour = np.broadcast_to(colour[:, :, None, :], (*ys.shape, 3))
        for oy, ox in ((0, 0), (0, 1), (1, 0), (1, 1)):
            keep = np.broadcast_to(thick[:, :, None] | ((oy, ox) == (0, 0)), ys.shape)
            yy = np.clip(ys[keep].astype(int) + oy, 0, size - 1)
            xx = np.clip(xs[keep].astype(int) + ox, 0, size - 1)
            images[image_index[keep], :, yy, xx] = stroke_colour[keep]

    # The object: a palette colour modulated by its texture (written only where the mask is).
    inside = np.nonzero(masks)
    colour = _palette(rng, (n,)).astype(np.float32)
    images[inside[0], :, inside[1], inside[2]] = colour[inside[0]] * texture[inside][:, None]
    # Uniform pixel noise with standard deviation `noise`, generated into one buffer (no temporaries).
    jitter = np.empty(images.shape, dtype=np.float32)
    rng.random(out=jitter, dtype=np.float32)
    jitter -= np.float32(0.5)
    jitter *= np.float32(2 * noise * np.sqrt(3.0))
    images += jitter
    del jitter
    np.clip(images, 0.0, 1.0, out=images)
    return ShapesData(
        torch.from_numpy(images),
        torch.from_numpy(labels.astype(np.int64)),
        torch.from_numpy(masks),
        torch.from_numpy(np.stack([cy, cx], axis=1)),
        torch.from_numpy(radius),
        torch.from_numpy(theta),
    )


class ShapesCNN(nn.Module):
    """Four Conv-BN-ReLU blocks, the first three with stride 2 (64 -> 32 -> 16 -> 8), global average
    pool, Linear. Piecewise linear with biases, so FullGrad's completeness holds exactly; Grad-CAM's
    default layer is the last block's 8 x 8 output. The receptive field of a last-block unit is 31
    pixels, about one object."""

    def __init__(self, width: int = 8, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        blocks: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            stride = 2 if index < 3 else 1
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def train_shapes_cnn(
    data: ShapesData,
    *,
    epochs: int = 6,
    batch_size: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
    width: int = 8,
    on_epoch: Callable[[int, float], object] | None = None,
) -> nn.Module:
    """Train :class:`ShapesCNN` with Adam (one-cycle learning rate) and fixed seeds; returned in eval
    mode. ``on_epoch(epoch, loss)`` is called after each epoch (for progress lines)."""
    torch.manual_seed(seed)
    model = ShapesCNN(width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.15, div_factor=5.0
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(data))
    model.eval()
    return model


@torch.no_grad()
def shapes_accuracy(model: nn.Module, data: ShapesData, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in [0, 1] (evaluated in batches)."""
    correct = 0
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        correct += int((model(chunk.images).argmax(dim=1) == chunk.labels).sum())
    return correct / len(data)


__all__ = ["CLASSES", "ShapesCNN", "ShapesData", "make_shapes_data", "shapes_accuracy", "train_shapes_cnn"]
