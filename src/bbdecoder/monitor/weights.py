"""Weight snapshots: histograms on fixed bins, quantiles and summary statistics."""

from __future__ import annotations

import math

import numpy as np
import torch

from bbdecoder.monitor.cpu_reductions import flat_array, kernel_threads, update_norms
from bbdecoder.store.vocabulary import QUANTILES, quantile_name, weight_stat_names

__all__ = [
    "QUANTILES",
    "UpdateRatios",
    "fixed_range",
    "histogram",
    "quantile_name",
    "update_ratios",
    "weight_stat_names",
    "weight_statistics",
]


def fixed_range(weight: torch.Tensor, margin: float = 1.5) -> tuple[float, float]:
    """Symmetric histogram range chosen once per tensor: ``margin * max|W|`` over the finite
    values (at least 1e-3, so a diverged or all-zero tensor still gets a usable range)."""
    magnitude = weight.detach().abs()
    finite = magnitude[torch.isfinite(magnitude)]
    r = float(finite.max()) * margin if finite.numel() else 0.0
    r = max(r, 1e-3)
    return -r, r


def histogram(weight: torch.Tensor, lo: float, hi: float, nbins: int) -> np.ndarray:
    """Counts on ``nbins`` equal bins of ``[lo, hi]``; out-of-range values go to the end bins,
    NaN is left out (+-Inf count in the end bins)."""
    flat = weight.detach().reshape(-1).float()
    flat = flat[~torch.isnan(flat)].clamp(lo, hi)
    return torch.histc(flat, bins=nbins, min=lo, max=hi).to(torch.int64).cpu().numpy()


def weight_statistics(weights: list[torch.Tensor], quantiles: tuple[float, ...] = QUANTILES) -> np.ndarray:
    """``(n, 3 + len(quantiles))`` float64 rows in the order of :func:`weight_stat_names`.

    Quantiles interpolate linearly between order statistics (NumPy's default), via a sort, so
    tensors of any size work (``torch.quantile`` refuses more than 16M elements).
    """
    rows = []
    for w in weights:
        flat = w.detach().reshape(-1).double()
        std, mean = torch.std_mean(flat, correction=0)
        ordered = flat.sort().values
        pos = torch.tensor(quantiles, dtype=torch.float64, device=flat.device) * (flat.numel() - 1)
        lo_i = pos.floor().long()
        hi_i = pos.ceil().long()
        qs = ordered[lo_i] + (ordered[hi_i] - ordered[lo_i]) * (pos - lo_i)
        rows.append(torch.cat([torch.stack([mean, std, flat.norm()]), qs]))
    if not rows:
        return np.zeros((0, 3 + len(quantiles)))
    return torch.stack(rows).cpu().numpy()


class UpdateRatios:
    """``||W_now - W_before|| / ||W_before||`` per tensor against one snapshot allocated once (no
    clone per step). Where ``||W_before|| == 0`` (a zero-initialised bias) the absolute update size
    ``||W_now - W_before||`` is reported instead, never ``inf``.

    On CPU a large weight and its snapshot are each read once from memory per step
    (:func:`~bbdecoder.monitor.cpu_reductions.update_norms`): per cache-sized chunk the snapshot
    chunk becomes the difference (its squared norm, a BLAS dot product), then the weight (its
    squared norm), from cache (``||W_now||`` is the next step's ``||W_before||``, so no separate
    pass); chunk sums are added in float64 (relative error ~3e-8 per chunk). Weights that are not
    dense in memory go through four foreach ops together (their norms accumulate in float32,
    ~1e-6); on other devices all tensors do (no host sync)."""

    def __init__(self) -> None:
        self._snapshot: list[torch.Tensor] | None = None
        self._plan: _CpuPlan | None = None  # the weights' views, while the weights stay where they are
        self._norms: torch.Tensor | list[float] | None = None  # ||W_before||; a list on the CPU path
        self._valid = False

    @property
    def ready(self) -> bool:
        """A snapshot to compare against was taken (and not used up)."""
        return self._valid

    def reset(self) -> None:
        self._snapshot = None
        self._plan = None
        self._norms = None
        self._valid = False

    def remember(self, current: list[torch.Tensor]) -> None:
        """Take the snapshot the next :meth:`measure` compares against."""
        if self._snapshot is None or len(self._snapshot) != len(current):
            self._snapshot = [t.detach().clone() for t in current]
            self._plan = None
        else:
            torch._foreach_copy_(self._snapshot, [t.detach() for t in current])
        self._norms = torch.stack(torch._foreach_norm(self._snapshot, 2)).double() if current else None
        self._valid = bool(current)
        if current and self._plan is None and all(t.device.type == "cpu" for t in current):
            self._plan = _CpuPlan(current, self._snapshot)  # the views, for a first measure_aside too

    def measure(self, current: list[torch.Tensor], keep: bool = True) -> torch.Tensor:
        """Ratios ``(n,)`` (float64, on the weights' device) since the snapshot; with ``keep`` the
        snapshot then becomes ``current``, else it is used up."""
        assert self._snapshot is not None and self._norms is not None and self._valid
        if current[0].device.type == "cpu":
            return torch.from_numpy(self.measure_host(current, keep))
        current = [t.detach() for t in current]
        torch._foreach_sub_(self._snapshot, current)
        delta = torch.stack(torch._foreach_norm(self._snapshot, 2)).double()
        after = None
        if keep:
            torch._foreach_copy_(self._snapshot, current)
            after = torch.stack(torch._foreach_norm(self._snapshot, 2)).double()
        before = self._norms
        assert isinstance(before, torch.Tensor)
        ratios = torch.where(before > 0, delta / torch.where(before > 0, before, 1.0), delta)
        self._norms = after
        self._valid = keep
        return ratios

    def measure_host(self, current: list[torch.Tensor], keep: bool = True) -> np.ndarray:
        """:meth:`measure` of CPU weights, as a NumPy ``(n,)`` array: every dense float weight
        through :func:`~bbdecoder.monitor.cpu_reductions.update_norms` (one code path, so it stays
        warm in the caches a backward pass has just flushed), other layouts through foreach ops."""
        assert self._snapshot is not None and self._norms is not None and self._valid
        plan = self._plan
        if plan is None or not plan.fits(current):
            plan = self._plan = _CpuPlan(current, self._snapshot)
        squares = [(0.0, 0.0)] * len(current)
        if plan.dense:
            # on the training thread: the kernel may split the pass over torch's threads
            found = update_norms(plan.weights, plan.snapshots, keep, threads=kernel_threads())
            for i, pair in zip(plan.dense, found, strict=True):
                squares[i] = pair
        if plan.other:
            now = [current[i].detach() for i in plan.other]
            snap = [self._snapshot[i] for i in plan.other]
            torch._foreach_sub_(snap, now)
            deltas = torch.stack(torch._foreach_norm(snap, 2)).double().square().tolist()
            norms = [0.0] * len(now)
            if keep:
                torch._foreach_copy_(snap, now)
                norms = torch.stack(torch._foreach_norm(snap, 2)).double().square().tolist()
            for i, pair in zip(plan.other, zip(deltas, norms, strict=True), strict=True):
                squares[i] = pair
        ratios, after = self._finish(squares)
        self._norms = after if keep else None
        self._valid = keep
        return ratios

    def _finish(self, squares: list[tuple[float, float]]) -> tuple[np.ndarray, list[float]]:
        # per tensor in Python floats: each NumPy call on a few numbers costs more than the arithmetic
        assert self._norms is not None
        ratios, after = [], []
        before_norms = self._norms.numpy().tolist() if isinstance(self._norms, torch.Tensor) else self._norms
        for before, (delta, norm) in zip(before_norms, squares, strict=True):
            size = math.sqrt(delta)
            ratios.append(size / before if before > 0 else size)  # a zero weight: the absolute update
            after.append(math.sqrt(norm))
        return np.array(ratios), after

    def measure_aside(self, current: list[torch.Tensor]) -> Measured | None:
        """:meth:`measure_host` with ``keep``, run off the training thread: the new snapshot goes
        into a second buffer (allocated once: a second copy of the weights) and this tracker is left
        as it was, so the result is taken with :meth:`adopt` or dropped. ``None`` where the weights
        are not all dense CPU weights of the known layout (then :meth:`measure_host` does it)."""
        plan = self._plan
        if not self._valid or plan is None or plan.other or not plan.fits(current):
            return None
        if plan.spare_tensors is None:
            assert self._snapshot is not None
            plan.spare_tensors = [torch.empty_like(self._snapshot[i]) for i in plan.dense]
            views = [flat_array(t) for t in plan.spare_tensors]
            if any(v is None for v in views):
                plan.spare_tensors = None
                return None
            plan.spares = [v for v in views if v is not None]
        ratios, after = self._finish(update_norms(plan.weights, plan.snapshots, True, into=plan.spares))
        return Measured(ratios, after, plan)

    def adopt(self, measured: Measured, keep: bool = True) -> np.ndarray:
        """Take a :meth:`measure_aside` result as :meth:`measure_host` would have given it: with
        ``keep`` its spare buffers become the snapshot, else the snapshot is used up; returns the
        ratios ``(n,)``."""
        plan = measured.plan
        assert plan is self._plan and plan.spare_tensors is not None and self._snapshot is not None
        if keep:
            for k, i in enumerate(plan.dense):
                self._snapshot[i], plan.spare_tensors[k] = plan.spare_tensors[k], self._snapshot[i]
            plan.snapshots, plan.spares = plan.spares, plan.snapshots
        self._norms = measured.after if keep else None
        self._valid = keep
        return measured.ratios


class Measured:
    """The ratios of :meth:`UpdateRatios.measure_aside`, with the norms and the plan they belong to."""

    def __init__(self, ratios: np.ndarray, after: list[float], plan: _CpuPlan) -> None:
        self.ratios, self.after, self.plan = ratios, after, plan


class _CpuPlan:
    """Which weights take the NumPy pass, with the NumPy views of them and of their snapshots.

    Parameters are updated in place, so the views stay valid from step to step; :meth:`fits`
    checks each weight's address, shape, strides and dtype (a ``p.data = ...`` replaces them),
    which costs a fraction of making the views again."""

    def __init__(self, current: list[torch.Tensor], snapshot: list[torch.Tensor]) -> None:
        self.key = _layout_key(current)
        self.dense: list[int] = []
        self.other: list[int] = []
        self.weights: list[np.ndarray] = []
        self.snapshots: list[np.ndarray] = []
        # the second snapshot buffers of UpdateRatios.measure_aside (of the dense weights), once used
        self.spare_tensors: list[torch.Tensor] | None = None
        self.spares: list[np.ndarray] = []
        for i, (w, s) in enumerate(zip(current, snapshot, strict=True)):
            fw, fs = flat_array(w), flat_array(s)
            if fw is not None and fs is not None and w.stride() == s.stride() and w.dtype == s.dtype:
                self.dense.append(i)
                self.weights.append(fw)
                self.snapshots.append(fs)
            else:
                self.other.append(i)

    def fits(self, current: list[torch.Tensor]) -> bool:
        return _layout_key(current) == self.key


def _layout_key(tensors: list[torch.Tensor]) -> list[tuple[object, ...]]:
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors]


def update_ratios(snapshot: list[torch.Tensor], current: list[torch.Tensor]) -> torch.Tensor:
    """``||W_now - W_before|| / ||W_before||`` per tensor (``||ΔW||`` where ``||W_before|| = 0``),
    shape ``(n,)``; ``snapshot`` is then overwritten with ``current``."""
    tracker = UpdateRatios()
    tracker._snapshot = snapshot
    tracker._norms = torch.stack(torch._foreach_norm(snapshot, 2)).double()
    tracker._valid = True
    return tracker.measure(current)
