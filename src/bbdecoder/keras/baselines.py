"""Baselines for channels-last Keras inputs, the same as the PyTorch side's, transposed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bbdecoder.attribution.baselines import NAMED_BASELINES, make_baseline
from bbdecoder.keras._backend import tf


def keras_baseline(spec: Any, inputs: Any, seed: int = 0, *, blur_sigma: float | None = None) -> Any:
    """The baseline for channels-last ``inputs``, a tf.Tensor with their shape and dtype.

    Named baselines are made by :func:`bbdecoder.attribution.make_baseline` on the channels-first view,
    so ``"uniform"`` and ``"blur"`` give exactly the PyTorch side's baselines, transposed.
    """
    x = tf.convert_to_tensor(inputs)
    if isinstance(spec, str):
        if spec not in NAMED_BASELINES:
            raise ValueError(
                f"unknown baseline {spec!r}; use one of {', '.join(NAMED_BASELINES)}, a number, a tensor "
                "broadcastable to the inputs, or a callable f(inputs) -> tensor"
            )
        channels_first = torch.from_numpy(_to_channels_first(x.numpy()))
        made = make_baseline(spec, channels_first, seed, blur_sigma=blur_sigma).numpy()
        return tf.constant(_to_channels_last(made), dtype=x.dtype)
    if isinstance(spec, bool):
        raise TypeError("a baseline cannot be a bool; use 0.0 or 1.0")
    if isinstance(spec, (int, float)):
        return tf.fill(tf.shape(x), tf.constant(float(spec), dtype=x.dtype))
    if isinstance(spec, (tf.Tensor, np.ndarray)):
        return _broadcast(spec, x, "tensor")
    if callable(spec):
        made = spec(x)
        if not isinstance(made, (tf.Tensor, np.ndarray)):
            raise TypeError(f"a baseline callable must return a tensor, got {type(made).__name__}")
        return _broadcast(made, x, "callable's result")
    raise TypeError(f"a baseline must be a name, a number, a tensor or a callable, got {type(spec).__name__}")


def _to_channels_first(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, -1, 1)) if array.ndim >= 3 else array


def _to_channels_last(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, 1, -1)) if array.ndim >= 3 else array


def _broadcast(baseline: Any, x: Any, what: str) -> Any:
    value = tf.cast(tf.convert_to_tensor(baseline), x.dtype)
    try:
        return tf.identity(tf.broadcast_to(value, tf.shape(x)))
    except (tf.errors.InvalidArgumentError, ValueError):
        raise ValueError(
            f"the baseline {what} has shape {tuple(value.shape)}, which does not broadcast to the "
            f"inputs' shape {tuple(x.shape)}; give one baseline per sample (N, ...) or one for all (1, ...)"
        ) from None


__all__ = ["keras_baseline"]
