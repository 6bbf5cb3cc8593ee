"""Weight snapshots: histograms on fixed bins, quantiles and summary statistics."""

from __future__ import annotations

import numpy as np
import torch

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


RATIO_CHUNK = 1 << 17
"""Elements per chunk of the CPU update-ratio pass with one intra-op thread (the difference stays in
cache); whole tensors with more threads (see :func:`bbdecoder.monitor.grad_stats.chunk_size`)."""


def _memory_flat(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of ``t`` in memory order (also for channels-last weights), or ``None``."""
    if t.is_contiguous():
        return t.view(-1)
    dense = any(
        t.dim() == d and t.is_contiguous(memory_format=f)
        for d, f in ((4, torch.channels_last), (5, torch.channels_last_3d))
    )
    return t.as_strided((t.numel(),), (1,)) if dense else None


class UpdateRatios:
    """``||W_now - W_before|| / ||W_before||`` per tensor against one snapshot allocated once (no
    clone per step). Where ``||W_before|| == 0`` (a zero-initialised bias) the absolute update size
    ``||W_now - W_before||`` is reported instead, never ``inf``.

    On CPU a large weight is read once from memory per step: per cache-sized chunk the snapshot
    chunk becomes the difference (its norm), then the weight (its norm), all four ops from cache
    (``||W_now||`` is the next step's ``||W_before||``, so no separate pass).
    Small tensors go through four foreach ops together; on other devices all tensors do (no host
    sync). Norms accumulate in float32 per chunk (relative error ~1e-5), summed in float64."""

    def __init__(self) -> None:
        self._snapshot: list[torch.Tensor] | None = None
        self._norms: torch.Tensor | None = None
        self._valid = False

    @property
    def ready(self) -> bool:
        """A snapshot to compare against was taken (and not used up)."""
        return self._valid

    def reset(self) -> None:
        self._snapshot = None
        self._norms = None
        self._valid = False

    def remember(self, current: list[torch.Tensor]) -> None:
        """Take the snapshot the next :meth:`measure` compares against."""
        if self._snapshot is None or len(self._snapshot) != len(current):
            self._snapshot = [t.detach().clone() for t in current]
        else:
            torch._foreach_copy_(self._snapshot, current)
        self._norms = torch.stack(torch._foreach_norm(self._snapshot, 2)).double() if current else None
        self._valid = bool(current)

    def measure(self, current: list[torch.Tensor], keep: bool = True) -> torch.Tensor:
        """Ratios ``(n,)`` (float64, on the weights' device) since the snapshot; with ``keep`` the
        snapshot then becomes ``current``, else it is used up."""
        assert self._snapshot is not None and self._norms is not None and self._valid
        if current[0].device.type == "cpu":
            delta, after = self._measure_cpu(current, keep)
        else:
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

    def _measure_cpu(
        self, current: list[torch.Tensor], keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert self._snapshot is not None
        chunked, grouped, flats = [], [], []
        for i, (w, s) in enumerate(zip(current, self._snapshot, strict=True)):
            fw, fs = (_memory_flat(w), _memory_flat(s)) if w.numel() > RATIO_CHUNK else (None, None)
            if fw is not None and fs is not None and w.stride() == s.stride() and w.dtype == s.dtype:
                chunked.append(i)
                flats.append((fw, fs))
            else:
                grouped.append(i)
        squares = np.zeros((len(current), 2))
        if grouped:
            now = [current[i] for i in grouped]
            snap = [self._snapshot[i] for i in grouped]
            torch._foreach_sub_(snap, now)
            squares[grouped, 0] = torch.stack(torch._foreach_norm(snap, 2)).double().numpy() ** 2
            if keep:
                torch._foreach_copy_(snap, now)
                squares[grouped, 1] = torch.stack(torch._foreach_norm(snap, 2)).double().numpy() ** 2
        if chunked:
            partial: list[torch.Tensor] = []
            owner: list[int] = []
            step = RATIO_CHUNK if torch.get_num_threads() <= 1 else 1 << 62  # see grad_stats.chunk_size
            for i, (fw, fs) in zip(chunked, flats, strict=True):
                for start in range(0, fw.numel(), step):
                    w_part, s_part = fw[start : start + step], fs[start : start + step]
                    s_part.sub_(w_part)  # the chunk now stays in cache for the next three ops
                    partial.append(torch.linalg.vector_norm(s_part))
                    if keep:
                        s_part.copy_(w_part)
                        partial.append(torch.linalg.vector_norm(s_part))
                    else:
                        partial.append(partial[-1])
                    owner.append(i)
            norms = torch.stack(partial).view(-1, 2).double().numpy()
            np.add.at(squares, np.array(owner), norms**2)
        table = torch.from_numpy(np.sqrt(squares))
        return table[:, 0], (table[:, 1] if keep else None)


def update_ratios(snapshot: list[torch.Tensor], current: list[torch.Tensor]) -> torch.Tensor:
    """``||W_now - W_before|| / ||W_before||`` per tensor (``||ΔW||`` where ``||W_before|| = 0``),
    shape ``(n,)``; ``snapshot`` is then overwritten with ``current``."""
    tracker = UpdateRatios()
    tracker._snapshot = snapshot
    tracker._norms = torch.stack(torch._foreach_norm(snapshot, 2)).double()
    tracker._valid = True
    return tracker.measure(current)
