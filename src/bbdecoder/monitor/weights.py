"""Weight snapshots: histograms on fixed bins, quantiles and summary statistics."""

from __future__ import annotations

import numpy as np
import torch

from bbdecoder.monitor.cpu_reductions import flat_array, update_norms
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
        self._snapshot_flat: list[np.ndarray | None] | None = None  # NumPy views, made once
        self._norms: torch.Tensor | None = None
        self._valid = False

    @property
    def ready(self) -> bool:
        """A snapshot to compare against was taken (and not used up)."""
        return self._valid

    def reset(self) -> None:
        self._snapshot = None
        self._snapshot_flat = None
        self._norms = None
        self._valid = False

    def remember(self, current: list[torch.Tensor]) -> None:
        """Take the snapshot the next :meth:`measure` compares against."""
        if self._snapshot is None or len(self._snapshot) != len(current):
            self._snapshot = [t.detach().clone() for t in current]
            self._snapshot_flat = None
        else:
            torch._foreach_copy_(self._snapshot, current)
        self._norms = torch.stack(torch._foreach_norm(self._snapshot, 2)).double() if current else None
        self._valid = bool(current)

    def measure(self, current: list[torch.Tensor], keep: bool = True) -> torch.Tensor:
        """Ratios ``(n,)`` (float64, on the weights' device) since the snapshot; with ``keep`` the
        snapshot then becomes ``current``, else it is used up."""
        assert self._snapshot is not None and self._norms is not None and self._valid
        if current[0].device.type == "cpu":
            return self._measure_cpu(current, keep)
        torch._foreach_sub_(self._snapshot, current)
        delta = torch.stack(torch._foreach_norm(self._snapshot, 2)).double()
        after = None
        if keep:
            torch._foreach_copy_(self._snapshot, current)
            after = torch.stack(torch._foreach_norm(self._snapshot, 2)).double()
        before = self._norms
        ratios = torch.where(before > 0, delta / torch.where(before > 0, before, 1.0), delta)
        self._norms = after
        self._valid = keep
        return ratios

    def _measure_cpu(self, current: list[torch.Tensor], keep: bool) -> torch.Tensor:
        """The CPU pass in NumPy: every dense float weight through
        :func:`~bbdecoder.monitor.cpu_reductions.update_norms` (one code path, so it stays warm in
        the caches a backward pass has just flushed), other layouts through foreach ops."""
        assert self._snapshot is not None and self._norms is not None
        if self._snapshot_flat is None:  # reset wherever the snapshot is allocated
            self._snapshot_flat = [flat_array(s) for s in self._snapshot]
        dense, other, pairs = [], [], []
        snapshots = zip(self._snapshot, self._snapshot_flat, strict=True)
        for i, (w, (s, fs)) in enumerate(zip(current, snapshots, strict=True)):
            fw = flat_array(w)
            if fw is not None and fs is not None and w.stride() == s.stride() and w.dtype == s.dtype:
                dense.append(i)
                pairs.append((fw, fs))
            else:
                other.append(i)
        squares = np.zeros((len(current), 2))
        if dense:
            weights, snapshots = zip(*pairs, strict=True)
            squares[dense] = update_norms(list(weights), list(snapshots), keep)
        if other:
            now = [current[i] for i in other]
            snap = [self._snapshot[i] for i in other]
            torch._foreach_sub_(snap, now)
            squares[other, 0] = torch.stack(torch._foreach_norm(snap, 2)).double().numpy() ** 2
            if keep:
                torch._foreach_copy_(snap, now)
                squares[other, 1] = torch.stack(torch._foreach_norm(snap, 2)).double().numpy() ** 2
        norms = np.sqrt(squares)
        before = self._norms.numpy()
        ratios = norms[:, 0] / np.where(before > 0, before, 1.0)
        ratios[before <= 0] = norms[before <= 0, 0]  # a zero weight: the absolute update size
        self._norms = torch.from_numpy(norms[:, 1].copy()) if keep else None
        self._valid = keep
        return torch.from_numpy(ratios)


def update_ratios(snapshot: list[torch.Tensor], current: list[torch.Tensor]) -> torch.Tensor:
    """``||W_now - W_before|| / ||W_before||`` per tensor (``||ΔW||`` where ``||W_before|| = 0``),
    shape ``(n,)``; ``snapshot`` is then overwritten with ``current``."""
    tracker = UpdateRatios()
    tracker._snapshot = snapshot
    tracker._norms = torch.stack(torch._foreach_norm(snapshot, 2)).double()
    tracker._valid = True
    return tracker.measure(current)
