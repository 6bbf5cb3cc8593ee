"""The Keras capture's TF-op path (under XLA, without the fused kernels, or with several replicas):
each step's table of gradient statistics, update ratios and finiteness flags, computed by TF ops
inside the compiled train step. The host path is :mod:`bbdecoder.keras.monitor_host`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bbdecoder.keras._backend import tf
from bbdecoder.keras.monitor_host import COLUMNS, NSTATS

CONDITION = 4.0
"""The one-pass variance ``E[g^2] - mean^2`` is used where ``E[g^2] <= CONDITION * var`` (the
PyTorch monitor's rule, :data:`bbdecoder.monitor.moment_rows.CONDITION`); elsewhere the two-pass."""


def dense_float(x: Any) -> Any:
    """A gradient or weight as the statistics take it: dense (``IndexedSlices`` converted), float32
    or float64 (other dtypes cast to float32)."""
    if isinstance(x, tf.IndexedSlices):
        x = tf.convert_to_tensor(x)
    return x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)


def _norm(x: Any, fused: bool) -> Any:
    """``||x||``: the fused ``EuclideanNorm`` kernel (no XLA kernel: under XLA, where the square and
    the sum fuse anyway, ``sqrt(sum(x^2))``)."""
    return tf.math.reduce_euclidean_norm(x) if fused else tf.sqrt(tf.reduce_sum(tf.square(x)))


def gradient_statistics(grad: Any, fused: bool = True) -> Any:
    """The six statistics of one gradient as a float32 ``(6,)`` tensor, in :data:`GRAD_STATS` order:
    mean, mean |g|, max |g|, population variance, L1, L2.

    XLA is off on CPU, so each TF op is its own pass, and an elementwise op allocates and writes
    its output: the sum, ``|g|`` (written once, read by its sum and its max) and
    ``reduce_euclidean_norm`` (one fused pass, half the time of a square and a sum) give every
    statistic; the variance is ``E[g^2] - mean^2`` where that loses no digits (``mean^2 <= 3 var``,
    the common case: relative error at most ``3 * CONDITION`` times that of the float32 sum of
    squares), else the exact two-pass ``sum((g - mean)^2) / n`` (a ``tf.cond``: only that branch
    runs). ``fused=False`` under XLA (see :func:`_norm`)."""
    g = dense_float(grad)
    n = tf.cast(tf.size(g), g.dtype)
    mean = tf.reduce_sum(g) / n
    magnitude = tf.abs(g)
    l1 = tf.reduce_sum(magnitude)
    l2 = _norm(g, fused)
    square_mean = l2 * l2 / n
    one_pass = tf.maximum(square_mean - mean * mean, 0.0)
    var = tf.cond(
        (square_mean <= CONDITION * one_pass) | (square_mean == 0),
        lambda: one_pass,
        lambda: tf.reduce_sum(tf.math.squared_difference(g, mean)) / n,
    )
    return tf.cast(tf.stack([mean, l1 / n, tf.reduce_max(magnitude), var, l1, l2]), tf.float32)


def finite_from_statistics(stats: Any) -> Any:
    """1.0 where the gradient of a :func:`gradient_statistics` row held no NaN/Inf, read from the row
    (no pass over the gradient): a NaN makes L1 NaN, an Inf (without NaN) makes ``max |g|`` +Inf; a
    finite gradient gives neither (an L1 that overflows is Inf, not NaN; an empty one has max -Inf)."""
    bad = tf.math.is_nan(stats[4]) | (stats[2] == np.float32(np.inf))
    return tf.cast(tf.logical_not(bad), tf.float32)


def update_ratio(before: Any, after: Any, fused: bool = True) -> Any:
    """``||after - before|| / ||before||``, or ``||after - before||`` where ``||before|| = 0`` (a
    zero-initialised bias): the PyTorch monitor's rule, never ``inf``."""
    before = tf.cast(before, tf.float32)
    delta = tf.sqrt(tf.reduce_sum(tf.math.squared_difference(tf.cast(after, tf.float32), before)))
    norm = _norm(before, fused)
    return tf.where(norm > 0, delta / tf.where(norm > 0, norm, 1.0), delta)


def _all_finite(grad: Any) -> Any:
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    return tf.cast(tf.reduce_all(tf.math.is_finite(values)), tf.float32)


def when_recorded(recorded: Any, compute: Callable[[], Any], skipped: Callable[[], Any]) -> Any:
    """``compute()`` on every step (``recorded`` is ``None``), else a ``tf.cond`` on ``recorded``."""
    return compute() if recorded is None else tf.cond(recorded, compute, skipped)


def step_table(
    picked: list[tuple[int, Any, Any]],
    n: int,
    apply: Callable[[], Any],
    *,
    gradients: bool,
    weights: bool,
    fused: bool,
    inv_scale: Callable[[], Any] | None,
    recorded: Any = None,
) -> tuple[Any, Any]:
    """``(table, apply())``: the step's ``(n, 8)`` float32 table (the six statistics, the update
    ratio, the finiteness flag of each ``(row, gradient, variable)`` of ``picked``; NaN elsewhere)
    around the optimizer's update ``apply``. ``inv_scale`` (called before the update): 1 / the loss
    scale of a ``LossScaleOptimizer``. ``recorded``: a boolean tensor, on steps where it is false
    nothing is computed and the table is all NaN (``None``: every step is recorded)."""
    k = len(picked)

    def nan(*shape: int) -> Any:
        return tf.fill(shape, np.float32(np.nan))

    def statistics() -> tuple[Any, Any]:
        if gradients and picked:
            rows = [gradient_statistics(g, fused) for _, g, _ in picked]
            stats = tf.stack(rows)
            if inv_scale is not None:
                inv = inv_scale()
                stats = stats * tf.stack([inv, inv, inv, inv * inv, inv, inv])
            return stats, tf.stack([finite_from_statistics(r) for r in rows])
        finite = tf.stack([_all_finite(g) for _, g, _ in picked]) if picked else nan(0)
        return nan(k, NSTATS), finite

    stats, finite = when_recorded(recorded, statistics, lambda: (nan(k, NSTATS), nan(k)))
    tracked = [v for _, _, v in picked] if weights else []
    # the copies a ratio needs (a read held across the in-place update makes TF copy the buffer);
    # a skipped step holds empty tensors instead
    before = []
    if tracked:
        before = when_recorded(
            recorded,
            lambda: [tf.identity(v.value) for v in tracked],
            lambda: [tf.zeros([0] * len(v.shape), v.dtype) for v in tracked],
        )
    result = apply()
    if tracked:
        ratios = when_recorded(
            recorded,
            lambda: tf.stack([update_ratio(b, v.value, fused) for v, b in zip(tracked, before, strict=True)]),
            lambda: nan(k),
        )
    else:
        ratios = nan(k)
    table = nan(n, COLUMNS)
    if picked:
        columns = tf.concat([stats, tf.reshape(ratios, (-1, 1)), tf.reshape(finite, (-1, 1))], axis=1)
        index = tf.constant([[r] for r, _, _ in picked], dtype=tf.int32)
        table = tf.tensor_scatter_nd_update(table, index, columns)
    return table, result
