"""Targets for Keras models, with the same meaning as :mod:`bbdecoder.targets` (PyTorch).

* ``None``: each sample's arg-max class;
* an ``int``: that class for every sample;
* a sequence, NumPy array or 1-D tensor of length N: one class per sample (length and range checked);
* a callable ``f(output) -> Tensor (N,)``: any scalar per sample (regression, multi-label, dict outputs).

A dict output with a ``logits`` entry is understood (class targets index it), as on PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bbdecoder.keras._backend import tf
from bbdecoder.targets import TargetError

KerasTargetLike = int | Sequence[int] | np.ndarray | Any | Callable[[Any], Any] | None
"""None, an int, one class per sample (sequence, array, tf.Tensor), or a callable f(output) -> (N,)."""


def is_callable_target(target: Any) -> bool:
    return callable(target) and not isinstance(target, (tf.Tensor, np.ndarray))


def _as_logits(output: Any, batch_size: int) -> Any:
    if isinstance(output, Mapping) and isinstance(output.get("logits"), tf.Tensor):
        output = output["logits"]  # PyTorch's ModelOutput convention: class targets index the logits
    if not isinstance(output, tf.Tensor):
        keys = f" (keys: {', '.join(map(str, output.keys()))})" if isinstance(output, Mapping) else ""
        raise TargetError(
            f"the model returned a {type(output).__name__}{keys} with no `logits` entry, not a tensor; "
            "pass `target` as a callable that picks one score per sample, "
            "e.g. target=lambda out: out['scores'][:, 3]"
        )
    if output.shape.rank == 0 or output.shape[0] != batch_size:
        raise TargetError(
            f"the model's output has shape {tuple(output.shape)} but the input batch has {batch_size} "
            "samples; did the input lack its batch dimension? (use x[None] for one sample)"
        )
    if output.shape.rank != 2:
        raise TargetError(
            f"class targets need an output of shape (N, classes), got {tuple(output.shape)}; pass "
            "`target` as a callable f(output) -> (N,) for segmentation, regression or other outputs"
        )
    return output


def resolve_classes(output: Any, target: KerasTargetLike, batch_size: int) -> Any:
    """The class index per sample: an int64 tf.Tensor of shape (N,) (not for callable targets)."""
    logits = _as_logits(output, batch_size)
    num_classes = int(logits.shape[1])
    if target is None:
        return tf.argmax(logits, axis=1, output_type=tf.int64)
    if isinstance(target, bool):
        raise TargetError("a target cannot be a bool")
    if isinstance(target, (int, np.integer)):
        classes = np.full((batch_size,), int(target), dtype=np.int64)
    else:
        classes = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
        if classes.ndim == 0:
            classes = np.broadcast_to(classes, (batch_size,))
        if classes.ndim != 1 or classes.shape[0] != batch_size:
            raise TargetError(
                f"got {classes.size} targets of shape {classes.shape} for a batch of {batch_size}; "
                "give one class per sample, a single int, or None for the arg-max"
            )
        if not np.issubdtype(classes.dtype, np.integer):
            raise TargetError(f"class targets must be integers, got dtype {classes.dtype}")
        classes = classes.astype(np.int64)
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        raise TargetError(
            f"target class {int(classes[bad][0])} is out of range: the model has {num_classes} outputs "
            f"(valid classes 0..{num_classes - 1})"
        )
    return tf.constant(classes)


def select_scores(output: Any, target: KerasTargetLike, batch_size: int) -> Any:
    """One differentiable score per sample: a tf.Tensor of shape (N,)."""
    if is_callable_target(target):
        assert callable(target)
        scores = target(output)
        if not isinstance(scores, tf.Tensor) or tuple(scores.shape) != (batch_size,):
            shape = tuple(scores.shape) if isinstance(scores, tf.Tensor) else type(scores).__name__
            raise TargetError(f"a callable target must return a tensor of shape ({batch_size},), got {shape}")
        return scores
    classes = resolve_classes(output, target, batch_size)
    return tf.gather(_as_logits(output, batch_size), classes, axis=1, batch_dims=1)


def fixed_target(output: Any, target: KerasTargetLike, batch_size: int) -> KerasTargetLike:
    """``None`` (and every class target) frozen to the classes of *this* output; callables are kept."""
    if is_callable_target(target):
        return target
    return resolve_classes(output, target, batch_size)


def rows_of(target: KerasTargetLike, rows: Any) -> KerasTargetLike:
    """The part of a per-sample class tensor that belongs to ``rows`` (indices); others apply to all rows."""
    if isinstance(target, tf.Tensor) and target.shape.rank == 1:
        return tf.gather(target, rows)
    return target


__all__ = ["KerasTargetLike", "TargetError", "fixed_target", "resolve_classes", "rows_of", "select_scores"]
