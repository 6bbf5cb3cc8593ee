"""Per-step gradient statistics, reduced on the device in a few vectorised ops.

For a list of gradient tensors the statistics come back as one ``(n, 6)`` float64 tensor on the
device, in the order of :data:`GRAD_STATS`; the caller copies it to the host once per step.

Op choice (measured on CPU, 1 thread; see BENCHMARKS.md "Training monitor" and
``bench/bench_grad_ops.py``): ``_foreach_norm``/``linalg.vector_norm`` accumulate float32 naively
(2e-5 to 2e-4 on 1M values), their 1- and inf-norms and ``var_mean`` are 4-60x slower, an
out-of-place elementwise op costs about twice a reduction (the write), and a torch op on a small
chunk costs 3-5 us of dispatch against ~1 us for a NumPy call on a view. So, on CPU:

- **with the fused kernels** (``bbdecoder.monitor._fused``, see
  :mod:`~bbdecoder.monitor.cpu_reductions`; the default where the extension built): every dense
  float32/float64 gradient, small or large, goes into one C call that reads each once from memory,
  sums ``g``, ``|g|`` and ``g^2`` in float64 (and the exact ``max|g|``) and computes the six
  statistics with the one-pass variance and redo rule of
  :func:`~bbdecoder.monitor.moment_rows.moment_rows` (the float64 sums make its error float64
  rounding, so it needs a second pass only beyond ``E[g^2] = 1e3 var``); one ``Tensor.numpy()``
  per gradient is the only torch call (:func:`~bbdecoder.monitor.moment_rows.fused_statistics`).
  Other gradients (sparse, half precision, strided views) take the path below;
- otherwise, **large tensors** (> :data:`TINY` elements) are read from memory once
  (:func:`bbdecoder.monitor.cpu_reductions.moments`): per chunk of 64K elements (it, a scratch
  chunk and a chunk of ones stay in L2) ``|g|`` goes into the scratch chunk, ``sum(g)``,
  ``sum(|g|)`` and ``sum(g^2)`` are BLAS dot products (``np.dot`` with the ones and with itself)
  and ``max|g|`` a vectorised ``max``, all from cache; chunk sums are added in float64. The
  variance is the one-pass ``E[g^2] - mean^2``, used only where ``E[g^2] <= CONDITION * var``
  (``mean^2 <= 3 var``, the common case for gradients): its relative error is then at most
  ``3 * CONDITION * delta`` with ``delta`` the relative error of a float32 dot product of one
  chunk (~3e-8 measured against float64; 1e-5 in the tests). Elsewhere (``1000 + N(0, 1)``, where
  the one-pass float32 formula is off by tens of percent), on squares that could overflow or
  underflow float32, and on NaN/Inf the tensor is redone exactly (float64 up to 64K elements,
  else the two-pass :meth:`GradStatistics._large`);
- and **small tensors** (biases, norms) are concatenated into one float64 vector and reduced per
  segment (NumPy ``reduceat``; on other devices ``index_add_``/``scatter_reduce_``, up to
  :data:`SMALL` elements): a fixed number of ops for all of them, exact to float64 rounding, no
  overflow.

On other devices (CUDA) large tensors take the two-pass path, with no host sync: ``|g|`` into one
preallocated scratch buffer (L1 by ``sum``, max by ``amax``), then ``(g - mean) * 2^-e`` into it
(``2^e`` >= max |g|, an exact scaling; squares <= 4) and its sum of squares: the variance is the
exact ``sum((g - mean)^2) / n``, relative error ~``log2(n) * 6e-8``. L2 is
``sqrt(sum((g - mean)^2) + n * mean^2)``, two non-negative terms.

A gradient is non-finite exactly when its ``max_abs`` is (NaN propagates through ``amax``); large
finite gradients (a loss times 1e20) give finite statistics. Update ratios live in
:mod:`bbdecoder.monitor.weights` (re-exported here).
"""

from __future__ import annotations

import numpy as np
import torch

from bbdecoder.monitor.cpu_reductions import CHUNK, Moments, Scratch, flat_array, fused_kernels, moments
from bbdecoder.monitor.moment_rows import CONDITION, fused_statistics, moment_rows
from bbdecoder.monitor.weights import UpdateRatios, update_ratios
from bbdecoder.store.vocabulary import GRAD_STATS

__all__ = ["CONDITION", "GRAD_STATS", "GradStatistics", "UpdateRatios", "grad_statistics", "small_statistics"]
__all__ += ["update_ratios"]

SMALL = 1 << 15
"""On devices other than the CPU, tensors up to this many elements are reduced together in float64."""

TINY = 1 << 12
"""On the CPU, tensors up to this many elements (biases, norms) are reduced together in float64;
larger ones each take one read (NumPy reductions cost ~1 us a call, so a 16K-element tensor is
cheaper alone than converted to float64)."""


class GradStatistics:
    """Callable computing :data:`GRAD_STATS` for a list of gradients; keeps its scratch buffers and
    the segment indices of the last layout, so a training loop allocates nothing per step."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._host_scratch = Scratch()
        self._layout: tuple[object, ...] | None = None
        self._small_index: list[int] = []
        self._large_index: list[int] = []
        self._segments: torch.Tensor | None = None
        self._small_counts: torch.Tensor | None = None
        self._order: torch.Tensor | None = None

    def __call__(self, grads: list[torch.Tensor], inv_scale: float = 1.0) -> torch.Tensor:
        """``(len(grads), 6)`` float64 statistics on the gradients' device (``inv_scale``: the
        factor that unscales AMP gradients, applied to the statistics, the gradients untouched)."""
        if not grads:
            return torch.empty(0, len(GRAD_STATS), dtype=torch.float64)
        if grads[0].device.type == "cpu":
            return torch.from_numpy(self.host(grads, inv_scale))
        grads = [_dense_float(g) for g in grads]
        stats = self._device(grads)
        if inv_scale != 1.0:
            s = inv_scale
            stats = stats * torch.tensor([s, s, s, s * s, s, s], dtype=torch.float64, device=stats.device)
        return stats

    def host(
        self, grads: list[torch.Tensor], inv_scale: float = 1.0, known: list[Moments | None] | None = None
    ) -> np.ndarray:
        """The same ``(len(grads), 6)`` statistics of CPU gradients as a NumPy array (the monitor's
        CPU step stays in NumPy: after a pass over megabytes of gradients every distinct call runs
        from cold caches, and a torch call touches more code than a NumPy one). ``known``: per
        gradient, its :func:`~bbdecoder.monitor.cpu_reductions.moments` already read (by
        :mod:`~bbdecoder.monitor.grad_prefetch`), or ``None``."""
        if not grads:
            return np.empty((0, len(GRAD_STATS)))
        fast = fused_statistics(grads, known)  # one torch call per gradient: dense float32/float64
        if fast is not None:
            stats, redo = fast
            self._redo(stats, redo, grads)
        else:
            grads = [_dense_float(g) for g in grads]
            stats = self._cpu(grads, known or [None] * len(grads))
        if inv_scale != 1.0:
            s = inv_scale
            stats *= np.array([s, s, s, s * s, s, s])
        return stats

    def _cpu(self, grads: list[torch.Tensor], known: list[Moments | None]) -> np.ndarray:
        """CPU: the same statistics, the small tensors together in float64, each large one read once
        (with the fused kernels every non-empty tensor, small or large, is read in their one call)."""
        together = 0 if fused_kernels() else TINY
        small = [i for i, g in enumerate(grads) if g.numel() <= together]
        large = [i for i, g in enumerate(grads) if g.numel() > together]
        rows = np.empty((len(grads), len(GRAD_STATS)))
        if small:
            rows[small] = small_statistics([grads[i] for i in small])
        if large:
            rows[large] = self._large_cpu([grads[i] for i in large], [known[i] for i in large])
        return rows

    def _device(self, grads: list[torch.Tensor]) -> torch.Tensor:
        self._plan(grads)
        parts = []
        if self._small_index:
            parts.append(self._small([grads[i] for i in self._small_index]))
        if self._large_index:
            parts.append(self._large([grads[i] for i in self._large_index]))
        stats = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self._small_index and self._large_index:
            assert self._order is not None
            stats = stats[self._order]
        return stats

    def _plan(self, grads: list[torch.Tensor]) -> None:
        layout = tuple((g.numel(), g.device, g.dtype) for g in grads)
        if layout == self._layout:
            return
        self._layout = layout
        self._small_index = [i for i, g in enumerate(grads) if g.numel() <= SMALL]
        self._large_index = [i for i, g in enumerate(grads) if g.numel() > SMALL]
        device = grads[0].device
        sizes = [grads[i].numel() for i in self._small_index]
        self._segments = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(sizes, dtype=torch.long, device=device)
        )
        self._small_counts = torch.tensor(sizes, dtype=torch.float64, device=device)
        order = np.argsort(np.array(self._small_index + self._large_index), kind="stable")
        self._order = torch.as_tensor(order, device=device)

    def _small(self, grads: list[torch.Tensor]) -> torch.Tensor:
        seg, counts = self._segments, self._small_counts
        assert seg is not None and counts is not None
        flat = (
            torch.cat([g.reshape(-1).double() for g in grads])
            if len(grads) > 1
            else grads[0].reshape(-1).double()
        )
        zeros = torch.zeros(len(grads), dtype=torch.float64, device=flat.device)
        total = zeros.index_add(0, seg, flat)
        mean = total / counts
        magnitude = flat.abs()
        l1 = zeros.index_add(0, seg, magnitude)
        max_abs = zeros.scatter_reduce(0, seg, magnitude, "amax")  # NaN propagates
        centred = flat - mean[seg]
        var = zeros.index_add(0, seg, centred * centred) / counts
        l2 = _inf_norms((var * counts + counts * mean * mean).sqrt(), max_abs)
        return torch.stack([mean, l1 / counts, max_abs, var, l1, l2], dim=1)

    def _large_cpu(self, grads: list[torch.Tensor], known: list[Moments | None]) -> np.ndarray:
        """One read of each gradient from memory (:func:`~bbdecoder.monitor.cpu_reductions.moments`,
        where ``known`` has none), the variance as ``E[g^2] - mean^2``; the rows
        :func:`~bbdecoder.monitor.moment_rows.moment_rows` marks are redone exactly (:meth:`_finish`)."""
        arrays = []
        for g in grads:
            a = flat_array(g)
            arrays.append(a if a is not None else g.detach().contiguous().view(-1).numpy())
        missing = [i for i, k in enumerate(known) if k is None]
        found = np.empty((len(grads), 4))
        found[missing] = moments([arrays[i] for i in missing], self._host_scratch)
        for i, k in enumerate(known):
            if k is not None:
                found[i] = k
        return self._finish(grads, found, np.array([a.size for a in arrays], dtype=np.float64))

    def _finish(self, grads: list[torch.Tensor], found: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The statistics from the moments (:func:`~bbdecoder.monitor.moment_rows.moment_rows`)."""
        rows, redo = moment_rows(found, sizes, fused_kernels())
        self._redo(rows, [int(i) for i in redo], grads)
        return rows

    def _redo(self, rows: np.ndarray, redo: list[int], grads: list[torch.Tensor]) -> None:
        """Rows where the one-pass formula would lose digits (see :data:`CONDITION`), whose squares
        could leave the range of the sums, or that hold NaN/Inf, recomputed exactly in place: in
        float64 up to one chunk, else by the two-pass :meth:`_large`."""
        if not redo:
            return
        in_float64 = [i for i in redo if grads[i].numel() <= CHUNK]
        two_pass = [i for i in redo if grads[i].numel() > CHUNK]
        if in_float64:
            rows[in_float64] = small_statistics([grads[i] for i in in_float64])
        if two_pass:
            rows[two_pass] = self._large([grads[i] for i in two_pass]).numpy()

    def _large(self, grads: list[torch.Tensor]) -> torch.Tensor:
        sums, l1s, maxima, bufs = [], [], [], []
        for g in grads:
            key = (g.dtype, g.device)
            if key not in self._scratch or self._scratch[key].numel() < g.numel():
                self._scratch[key] = torch.empty(g.numel(), dtype=g.dtype, device=g.device)
            buf = self._scratch[key][: g.numel()].view_as(g)
            bufs.append(buf)
            torch.abs(g, out=buf)
            l1s.append(buf.sum())
            maxima.append(buf.amax())
            sums.append(g.sum())
        max_abs = torch.stack(maxima)
        # 2^-e with 2^e >= max|g| (frexp: max = m * 2^e, 0.5 <= m < 1): exact scaling, squares <= 4
        _, exponent = torch.frexp(max_abs.clamp_min(torch.finfo(max_abs.dtype).tiny))
        scale = torch.ldexp(torch.ones_like(max_abs), -exponent)
        counts = torch.tensor([g.numel() for g in grads], dtype=max_abs.dtype, device=max_abs.device)
        mean_native = torch.stack(sums) / counts
        if max_abs.device.type == "cpu" and _squares_fit(max_abs, counts):
            # reading a CPU tensor costs no device sync: skip the scaling pass when no square can
            # overflow or underflow float32 (the common case); on CUDA the scaling always runs
            scale = torch.ones_like(max_abs)
            scaled = False
        else:
            scaled = True
        squares = []
        for g, buf, m, k in zip(grads, bufs, mean_native.unbind(), scale.unbind(), strict=True):
            torch.sub(g, m, out=buf)  # exact where g is within a factor 2 of the mean (Sterbenz)
            if scaled:
                buf.mul_(k)  # a power of two: exact, and every square is <= 4
            buf.mul_(buf)
            squares.append(buf.sum())
        n = counts.double()
        k = scale.double()
        centred_sq = torch.stack(squares).double() / (k * k)
        mean = torch.stack(sums).double() / n
        l1 = torch.stack(l1s).double()
        var = centred_sq / n
        l2 = _inf_norms((centred_sq + n * mean * mean).sqrt(), max_abs.double())
        return torch.stack([mean, l1 / n, max_abs.double(), var, l1, l2], dim=1)


def _dense_float(g: torch.Tensor) -> torch.Tensor:
    """``g`` as a strided float32/float64 tensor: a sparse gradient (``Embedding(sparse=True)``)
    densified, so its statistics count the zeros of the rows it does not touch; half precision
    widened."""
    if g.layout != torch.strided:
        g = g.to_dense()
    return g if g.dtype in (torch.float32, torch.float64) else g.float()


def small_statistics(grads: list[torch.Tensor]) -> np.ndarray:
    """The ``(n, 6)`` float64 statistics of CPU tensors (the exact redo of both monitors, NaN for
    an empty one), small ones together: one float64 vector, per-segment reductions (``reduceat``).
    Few NumPy calls in all: after a backward pass every distinct call starts from cold caches
    (measured ~5 us each against ~1 us warm), so the count matters more than the sizes here."""
    sizes = np.fromiter((g.numel() for g in grads), dtype=np.int64, count=len(grads))
    if not sizes.all():  # reduceat cannot express an empty segment
        return torch.stack([_small_reference(g) for g in grads]).numpy()
    # axis=None flattens each view: one torch call per tensor instead of three
    views = [(g.detach() if g.requires_grad else g).numpy() for g in grads]
    flat = np.concatenate(views, axis=None, dtype=np.float64)
    starts = np.cumsum(sizes) - sizes
    out = np.empty((len(grads), len(GRAD_STATS)))
    mean, l1, max_abs, var, l1_total, l2 = out.T  # views: each reduction writes its column
    with np.errstate(invalid="ignore", over="ignore"):
        np.divide(np.add.reduceat(flat, starts), sizes, out=mean)
        magnitude = np.abs(flat)
        l1_total[:] = np.add.reduceat(magnitude, starts)
        max_abs[:] = np.maximum.reduceat(magnitude, starts)  # NaN propagates
        flat -= np.repeat(mean, sizes)
        np.multiply(flat, flat, out=flat)
        np.divide(np.add.reduceat(flat, starts), sizes, out=var)
        np.divide(l1_total, sizes, out=l1)
        np.sqrt(var * sizes + sizes * mean * mean, out=l2)
    l2[max_abs == np.inf] = np.inf  # see _inf_norms
    return out


def _inf_norms(l2: torch.Tensor, max_abs: torch.Tensor) -> torch.Tensor:
    """``l2`` with ``+inf`` where ``max_abs`` is: a gradient with an Inf and no NaN has ``||g|| = inf``,
    but ``sqrt(n var + n mean^2)`` is NaN there (``inf - inf`` in the centred sum); no device sync."""
    return torch.where(max_abs == torch.inf, torch.inf, l2)


def _small_reference(g: torch.Tensor) -> torch.Tensor:
    """The statistics of one tensor in float64 (NaN for an empty one)."""
    x = g.detach().reshape(-1).double()
    if not x.numel():
        return torch.full((len(GRAD_STATS),), float("nan"), dtype=torch.float64)
    var, mean = torch.var_mean(x, correction=0)
    a = x.abs()
    return torch.stack([mean, a.mean(), a.max(), var, a.sum(), x.norm()])


def _squares_fit(max_abs: torch.Tensor, counts: torch.Tensor) -> bool:
    """True when every sum of squares of ``g - mean`` (each <= (2 max|g|)^2) stays far inside the
    float32 range: ``4 n max^2 < 1e36`` and ``max|g| > 1e-15`` (or exactly 0)."""
    m = max_abs.double()
    fits = (4.0 * counts.double() * m * m < 1e36) & ((m > 1e-15) | (m == 0))
    return bool(fits.all())


def grad_statistics(grads: list[torch.Tensor], inv_scale: float = 1.0) -> torch.Tensor:
    """Statistics of each gradient tensor: ``(len(grads), 6)`` float64 on the grads' device, in the
    order of :data:`GRAD_STATS` (a one-off :class:`GradStatistics`; the analyzer keeps one)."""
    return GradStatistics()(grads, inv_scale)
