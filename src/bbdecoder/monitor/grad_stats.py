"""Per-step gradient statistics, reduced on the device in a few fused ops.

For a list of gradient tensors the statistics come back as one ``(n, 6)`` tensor on the device, in
the order of :data:`GRAD_STATS`; the caller copies it to the host once per step.
"""

from __future__ import annotations

import numpy as np
import torch

GRAD_STATS: tuple[str, ...] = ("mean", "mean_abs", "max_abs", "var", "l1", "l2")
"""Gradient statistics per parameter tensor: mean, mean |g|, max |g|, population variance, L1, L2."""


def grad_statistics(grads: list[torch.Tensor], inv_scale: float = 1.0) -> torch.Tensor:
    """Statistics of each gradient tensor: ``(len(grads), 6)`` float32 on the grads' device.

    ``inv_scale`` divides the gradients first (``1 / GradScaler.get_scale()`` under AMP), without
    touching them: norms scale by ``inv_scale``, the variance by its square.
    """
    if not grads:
        return torch.empty(0, len(GRAD_STATS))
    grads = [g if g.dtype in (torch.float32, torch.float64) else g.float() for g in grads]
    # Chosen for speed on CPU and GPU: the 2-norm and plain sums are vectorised reductions, while
    # var_mean and the inf-norm are several times slower. The variance is the exact two-pass
    # ||g - mean||^2 / n (no cancellation), max |g| comes from aminmax.
    numel = [g.numel() for g in grads]
    means = [g.sum() / n for g, n in zip(grads, numel, strict=True)]
    centered = [g - m for g, m in zip(grads, means, strict=True)]
    centered_norm = torch.stack(torch._foreach_norm(centered, 2)).float()
    del centered
    l2 = torch.stack(torch._foreach_norm(grads, 2)).float()
    l1 = torch.stack([g.abs().sum() for g in grads]).float()
    extremes = [torch.aminmax(g) for g in grads]
    max_abs = torch.stack([torch.maximum(e.max, -e.min) for e in extremes]).float()
    mean = torch.stack(means).float()
    counts = torch.tensor(numel, dtype=torch.float32, device=l1.device)
    stats = torch.stack([mean, l1 / counts, max_abs, centered_norm * centered_norm / counts, l1, l2], dim=1)
    if inv_scale != 1.0:
        factors = torch.tensor(
            [inv_scale, inv_scale, inv_scale, inv_scale * inv_scale, inv_scale, inv_scale],
            dtype=torch.float32,
            device=stats.device,
        )
        stats = stats * factors
    return stats


def update_ratios(snapshot: list[torch.Tensor], current: list[torch.Tensor]) -> torch.Tensor:
    """``||W_now - W_before|| / ||W_before||`` per tensor, shape ``(n,)``; ``snapshot`` is then
    overwritten with ``current`` (ready for the next update). No extra copies are allocated."""
    before = torch.stack(torch._foreach_norm(snapshot, 2))
    torch._foreach_sub_(snapshot, current)
    delta = torch.stack(torch._foreach_norm(snapshot, 2))
    torch._foreach_copy_(snapshot, current)
    return delta / before


class EpochAccumulator:
    """Mean and population variance across iterations (Welford, float64, NaN/Inf skipped)."""

    def __init__(self, n_series: int, n_stats: int) -> None:
        self.count = np.zeros((n_series, n_stats))
        self.mean = np.zeros((n_series, n_stats))
        self.m2 = np.zeros((n_series, n_stats))

    def update(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Add one step: ``values[i]`` belongs to series ``rows[i]``."""
        finite = np.isfinite(values)
        count = self.count[rows] + finite
        safe = np.where(finite, values, 0.0)
        delta = np.where(finite, safe - self.mean[rows], 0.0)
        mean = self.mean[rows] + np.divide(delta, count, out=np.zeros_like(delta), where=count > 0)
        self.m2[rows] += delta * np.where(finite, safe - mean, 0.0)
        self.mean[rows] = mean
        self.count[rows] = count

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, var, count)``, each ``(n_series, n_stats)``; NaN where no finite value was seen."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.mean, np.nan)
            var = np.where(self.count > 0, self.m2 / self.count, np.nan)
        return mean, var, self.count.copy()
