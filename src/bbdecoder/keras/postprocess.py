"""Map post-processing for channels-last maps, matching :mod:`bbdecoder.attribution.postprocess`.

Resizing is a product with one interpolation matrix per spatial axis, built to reproduce
``torch.nn.functional.interpolate`` (linear modes) for both ``align_corners`` settings; TensorFlow's
``tf.image.resize`` has no ``align_corners=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bbdecoder.keras._backend import tf


def interpolation_matrix(in_size: int, out_size: int, *, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) float64 matrix of linear interpolation weights along one axis.

    ``align_corners=True``: output i samples input position ``i * (in - 1) / (out - 1)``;
    ``False``: ``(i + 0.5) * in / out - 0.5`` clamped at 0 (half-pixel centres, an image resize).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    out = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        source = out * scale
    else:
        source = np.maximum((out + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


def resize_to(maps: Any, size: tuple[int, ...], *, align_corners: bool) -> Any:
    """Linear resize of channels-last maps (N, *spatial, C) to ``size`` along every spatial axis."""
    rank = maps.shape.rank
    if rank - 2 != len(size):
        raise ValueError(f"cannot resize maps of shape {tuple(maps.shape)} to the spatial size {size}")
    for axis, target in enumerate(size, start=1):
        current = int(maps.shape[axis])
        if current == target:
            continue
        matrix = tf.constant(interpolation_matrix(current, target, align_corners=align_corners), maps.dtype)
        moved = tf.experimental.numpy.moveaxis(maps, axis, -1)  # (..., current)
        maps = tf.experimental.numpy.moveaxis(tf.matmul(moved, matrix, transpose_b=True), -1, axis)
    return maps


def channel_sum_minmax(values: Any, axis: int = -1, eps: float = 1e-6) -> Any:
    """``sum_c psi(|values|)`` with channels on ``axis``, returned channels-last (N, *spatial, 1).

    psi(v) = (v - min) / (max - min + eps) per sample over all of (spatial, C) jointly, as in the
    FullGrad reference; psi is affine per sample, so the channel sum is taken first.
    """
    magnitude = tf.abs(values)
    rank = values.shape.rank
    reduce_axes = list(range(1, rank))
    low = tf.reduce_min(magnitude, axis=reduce_axes)
    high = tf.reduce_max(magnitude, axis=reduce_axes)
    channels = tf.cast(tf.shape(values)[axis], values.dtype)
    summed = tf.reduce_sum(magnitude, axis=axis, keepdims=True)
    if axis % rank != rank - 1:
        summed = tf.experimental.numpy.moveaxis(summed, axis, -1)
    shape = [-1] + [1] * (rank - 1)
    return (summed - channels * tf.reshape(low, shape)) / tf.reshape(high - low + eps, shape)


def minmax_per_sample(maps: Any, eps: float = 1e-12) -> Any:
    """Scale each sample's map to [0, 1]; a constant map becomes all zeros (never NaN)."""
    rank = maps.shape.rank
    axes = list(range(1, rank))
    shape = [-1] + [1] * (rank - 1)
    low = tf.reshape(tf.reduce_min(maps, axis=axes), shape)
    span = tf.reshape(tf.reduce_max(maps, axis=axes), shape) - low
    scaled = (maps - low) / tf.maximum(span, eps)
    return tf.where(span > eps, scaled, tf.zeros_like(scaled))


__all__ = ["channel_sum_minmax", "interpolation_matrix", "minmax_per_sample", "resize_to"]
