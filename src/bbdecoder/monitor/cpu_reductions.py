"""One read from memory per tensor: the CPU reductions of the monitor, on NumPy views of the tensors.

Two implementations of the same two passes, :func:`moments` and :func:`update_norms`:

- **the fused kernels** (``bbdecoder.monitor._fused``, a small optional C extension built at
  install): one loop per array that reads it from memory once and does all the arithmetic in
  registers (SIMD, AVX2 where the CPU has it), sums accumulated in double (float64-exact up to the
  rounding of the additions), the GIL released for the whole list, so a pass on the writer thread
  runs beside the training thread. Measured (1 thread, BENCHMARKS.md "Training monitor"): the four
  moments of a gradient in the time of one ``torch._foreach_norm`` over it (0.31 against 0.32 ms
  for 1.2M float32), an update-ratio pass (two reads, one write) in 1.4-1.5x;
- **NumPy** (where the extension did not build, or with ``BBDECODER_FUSED=0``): a large tensor is
  walked in cache-sized chunks (:data:`CHUNK` elements, 256 KiB of float32: the chunk, a scratch
  chunk and a chunk of ones stay in L2). The first op on a chunk brings it in from memory, the
  others read it from cache. The sums are BLAS dot products (``np.dot``: vectorised, several
  accumulators, no write; relative error ~3e-8 on a 64K-element float32 chunk, measured against
  float64) and the maximum is NumPy's vectorised ``maximum.reduce``; chunk results are added in
  float64. About 3.5x the norm for the moments and 2.5-3x for the update ratios: five NumPy calls
  per chunk, and the GIL taken between them.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "CHUNK",
    "Moments",
    "Scratch",
    "flat_array",
    "fused_kernels",
    "fused_threads",
    "kernel_threads",
    "moments",
    "update_norms",
]


def _load_fused() -> tuple[ModuleType | None, bool]:
    if os.environ.get("BBDECODER_FUSED", "1") == "0":
        return None, False
    try:
        from bbdecoder.monitor import _fused
    except ImportError:  # the optional extension did not build here: NumPy does the passes
        return None, False
    # torch's extension module: its symbols resolve to the OpenMP runtime torch's own ops use
    return _fused, bool(_fused.use_openmp(torch._C.__file__))


FUSED, _THREADED = _load_fused()
"""The fused C kernels, or ``None`` where the NumPy passes run (the tests set it to compare both)."""


def fused_kernels() -> bool:
    """True where the monitor's CPU passes run in the fused C kernels (see the module docstring)."""
    return FUSED is not None


def fused_threads() -> bool:
    """True where the fused kernels split a pass on the training thread over torch's intra-op
    threads (``torch.get_num_threads()``); elsewhere the parts run one after the other, the same
    bits."""
    return FUSED is not None and _THREADED


def kernel_threads() -> int:
    """The threads a fused pass on the calling (training) thread is split over: torch's intra-op
    thread count where :func:`fused_threads`, else 1. Never for the writer thread: an OpenMP call
    from a thread without torch's pool would start one."""
    return torch.get_num_threads() if _THREADED else 1


CHUNK = 1 << 16
"""Elements per chunk (256 KiB of float32). NumPy runs on the calling thread whatever torch's
intra-op thread count, so the chunks are the same with one thread or many."""


def flat_array(t: torch.Tensor) -> np.ndarray | None:
    """A 1-D NumPy view of a CPU float tensor in memory order (also channels-last), or ``None``
    where the tensor is not dense in memory (the caller then uses torch ops)."""
    if t.requires_grad:  # a weight (gradients are not): each torch call costs ~3 us from cold caches
        t = t.detach()
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    if t.is_contiguous():
        return t.numpy().reshape(-1)
    dense = any(
        t.dim() == d and t.is_contiguous(memory_format=f)
        for d, f in ((4, torch.channels_last), (5, torch.channels_last_3d))
    )
    return t.as_strided((t.numel(),), (1,)).numpy() if dense else None


class Scratch:
    """Per-dtype scratch chunk and chunk of ones, allocated once."""

    def __init__(self) -> None:
        self._buffers: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, dtype: np.dtype, size: int) -> tuple[np.ndarray, np.ndarray]:
        have = self._buffers.get(dtype)
        if have is None or have[0].size < size:
            have = (np.empty(size, dtype), np.ones(size, dtype))
            self._buffers[dtype] = have
        return have


Moments = tuple[float, float, float, float]
"""``sum(g)``, ``sum(|g|)``, ``max|g|``, ``sum(g^2)`` of one array, as :func:`moments` returns them."""


def moments(arrays: list[np.ndarray], scratch: Scratch) -> list[Moments]:
    """``sum(g)``, ``sum(|g|)``, ``max|g|`` and ``sum(g^2)`` per array (1-D, contiguous, float32 or
    float64), each array read from memory once; float64 sums. A NaN or Inf in an array makes its
    sums non-finite (its maximum may then be wrong: the caller redoes such rows exactly)."""
    if FUSED is not None:
        return FUSED.moments(arrays)
    return numpy_moments(arrays, scratch)


def numpy_moments(arrays: list[np.ndarray], scratch: Scratch) -> list[Moments]:
    """:func:`moments` in NumPy, per cache-sized chunk (float64 sums of chunk results)."""
    out = []
    step = CHUNK
    longest = max((a.size for a in arrays), default=0)
    with np.errstate(over="ignore", invalid="ignore"):  # such rows are redone by the caller
        for a in arrays:
            magnitude, ones = scratch.get(a.dtype, min(step, longest))
            total = l1 = squares = top = 0.0
            for start in range(0, a.size, step):
                piece = a[start : start + step]
                n = piece.size
                mag = magnitude[:n]
                np.abs(piece, out=mag)
                total += float(np.dot(piece, ones[:n]))
                l1 += float(np.dot(mag, ones[:n]))
                squares += float(np.dot(piece, piece))
                top = max(top, float(np.maximum.reduce(mag)))
            out.append((total, l1, top, squares))
    return out


def update_norms(
    weights: list[np.ndarray],
    snapshots: list[np.ndarray],
    keep: bool,
    into: list[np.ndarray] | None = None,
    threads: int = 1,
) -> list[tuple[float, float]]:
    """``||snapshot - weight||^2`` and ``||weight||^2`` per pair. The snapshot is overwritten: with
    ``keep`` it becomes the weight (per chunk, the difference and the copy stay in cache: each
    weight and snapshot is read from memory once), else it is left holding the difference; without
    ``keep`` the second number is 0. With ``into`` (one spare array per weight) the spares are
    written instead and the snapshots left as they are: the same arithmetic, to the bit. All
    arrays 1-D and contiguous, each weight with its snapshot (and spare) of one dtype and size.
    ``threads``: the fused kernels' split over torch's threads (the training thread only)."""
    if FUSED is not None:
        return FUSED.update_norms(weights, snapshots, keep, into, threads)
    return numpy_update_norms(weights, snapshots, keep, into)


def numpy_update_norms(
    weights: list[np.ndarray],
    snapshots: list[np.ndarray],
    keep: bool,
    into: list[np.ndarray] | None = None,
) -> list[tuple[float, float]]:
    """:func:`update_norms` in NumPy, per cache-sized chunk (BLAS dot products, float64 sums)."""
    out = []
    step = CHUNK
    targets = snapshots if into is None else into
    with np.errstate(over="ignore", invalid="ignore"):  # a diverged weight: inf/NaN, as torch gives
        for w, s, t in zip(weights, snapshots, targets, strict=True):
            delta = norm = 0.0
            for start in range(0, w.size, step):
                end = start + step
                w_part, s_part, t_part = w[start:end], s[start:end], t[start:end]
                np.subtract(s_part, w_part, out=t_part)
                delta += float(np.dot(t_part, t_part))
                if keep:
                    np.copyto(t_part, w_part)
                    norm += float(np.dot(t_part, t_part))
            out.append((delta, norm))
    return out
