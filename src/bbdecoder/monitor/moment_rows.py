"""From four moments per gradient to its six statistics, for all gradients at once (NumPy columns).

:func:`~bbdecoder.monitor.cpu_reductions.moments` gives ``sum(g)``, ``sum(|g|)``, ``max|g|`` and
``sum(g^2)``; the statistics follow in a dozen vector ops whatever the number of tensors (a loop in
Python floats cost ~4 us a tensor after a backward pass: 0.2 ms for BERT-mini's 54). The variance is
the one-pass ``E[g^2] - mean^2``, kept only where it loses no digits; the other rows are returned to
be redone exactly (see :data:`CONDITION`).

:func:`fused_statistics` is the fast way in on CPU with the fused kernels: one ``Tensor.numpy()``
per gradient (the only torch call; the kernel checks the dtype and that the memory is dense) and
one C call that reads the gradients and does this module's arithmetic too (after a backward pass
each NumPy call starts from cold caches: the dozen of :func:`moment_rows` cost 0.2 ms); ``None``
where any gradient needs the general path (sparse, half precision, ``create_graph``, strided
views).
"""

from __future__ import annotations

import numpy as np
import torch

from bbdecoder.monitor import cpu_reductions
from bbdecoder.monitor.cpu_reductions import Moments

__all__ = ["CONDITION", "FUSED_CONDITION", "array_statistics", "fused_statistics", "moment_rows"]

CONDITION = 4.0
"""The one-pass variance ``E[g^2] - mean^2`` is used where ``E[g^2] <= CONDITION * var``, i.e.
``mean^2 <= 3 var``; its relative error is then at most ``3 * CONDITION * delta``, ``delta`` the
relative error of the NumPy path's float32 chunk sums of squares (~5e-8 measured, bounded by
~1e-6)."""

FUSED_CONDITION = 1e3
""":data:`CONDITION` for the fused kernels' float64 sums (``delta`` at most ``n / 2 * 2^-53`` with
their two or more SIMD lanes: a relative error of the variance of at most ~3e-6 at 2^24 elements
in the worst case, ~1e-12 typically), so ``0.5 + 0.1 U(0, 1)`` (``E[g^2] = 365 var``) needs no
second pass; ``1000 + N(0, 1)`` (``1e6 var``) still does."""


# the one-pass condition, and the range of max|g| whose squares the sums hold (4 n max^2 < largest,
# max > smallest): float64 in the fused kernels, float32 chunk sums on the NumPy path
_FUSED_BOUNDS = (FUSED_CONDITION, 1e300, 1e-140)
_NUMPY_BOUNDS = (CONDITION, 1e36, 1e-15)


def moment_rows(found: np.ndarray, sizes: np.ndarray, fused: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 6)`` statistics (mean, mean |g|, max |g|, var, L1, L2) from ``(n, 4)`` moments and the
    ``(n,)`` element counts, and the indices of the rows to redo exactly: where the one-pass
    variance would lose digits, where squares could leave the range of the sums (float32 on the
    NumPy path, float64 in the fused kernels), or where a gradient holds NaN/Inf (then its maximum
    may be wrong). ``fused``: the moments come from the fused kernels."""
    condition, largest, smallest = _FUSED_BOUNDS if fused else _NUMPY_BOUNDS
    total, l1, top, squares = found.T
    with np.errstate(invalid="ignore", over="ignore"):
        mean, square_mean = total / sizes, squares / sizes
        var = np.maximum(square_mean - mean * mean, 0.0)
        rows = np.stack([mean, l1 / sizes, top, var, l1, np.sqrt(squares)], axis=1)
        exact = (square_mean <= condition * var) | (square_mean == 0)
        fits = (4.0 * sizes * top * top < largest) & ((top > smallest) | (top == 0))
        finite = np.isfinite(total + l1 + top + squares)
    return rows, np.flatnonzero(~(exact & fits & finite))


def fused_statistics(
    grads: list[torch.Tensor], known: list[Moments | None] | None
) -> tuple[np.ndarray, list[int]] | None:
    """The ``(n, 6)`` statistics of CPU gradients and the rows to redo exactly, all in one call of
    the fused kernels (``known``: moments already read, see :mod:`~bbdecoder.monitor.grad_prefetch`),
    the same arithmetic as :func:`moment_rows` with ``fused=True``, on torch's intra-op threads (the
    training thread calls it); ``None`` where a gradient needs the general path."""
    if cpu_reductions.FUSED is None:
        return None
    try:
        arrays = [g.numpy() for g in grads]  # raises for sparse, bfloat16, other devices, requires_grad
    except (RuntimeError, TypeError):
        return None
    return array_statistics(arrays, known, cpu_reductions.kernel_threads())


def array_statistics(
    arrays: list[np.ndarray], known: list[Moments | None] | None = None, threads: int = 1
) -> tuple[np.ndarray, list[int]] | None:
    """:func:`fused_statistics` of NumPy arrays (any framework's gradients on the host): the
    ``(n, 6)`` statistics and the rows to redo exactly, or ``None`` without the fused kernels or
    where an array needs the general path (float16, a strided view)."""
    kernels = cpu_reductions.FUSED
    if kernels is None:
        return None
    try:
        table, redo = kernels.statistics(arrays, known or [None] * len(arrays), *_FUSED_BOUNDS, threads)
    except (TypeError, ValueError, BufferError):  # float16, a strided view
        return None
    return np.frombuffer(table).reshape(len(arrays), 6), redo
