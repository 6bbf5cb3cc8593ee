"""Rank statistics on the device: average ranks with ties, and row-wise Spearman correlation."""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M of every row of ``values`` (N, M), ties given their average rank (as scipy's rankdata)."""
    if values.dim() != 2:
        raise ValueError(f"average_ranks expects (N, M), got {tuple(values.shape)}")
    n, m = values.shape
    sorted_values, perm = torch.sort(values.double(), dim=1, stable=True)
    new_run = torch.ones_like(sorted_values, dtype=torch.bool)
    new_run[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    run_id = torch.cumsum(new_run.long(), dim=1) - 1  # 0-based tie group per row
    run_id = run_id + torch.arange(n, device=values.device)[:, None] * m  # unique across rows
    positions = torch.arange(1, m + 1, device=values.device, dtype=torch.float64).expand(n, m)
    sums = torch.zeros(n * m, device=values.device, dtype=torch.float64).index_add_(
        0, run_id.flatten(), positions.flatten()
    )
    sizes = torch.zeros(n * m, device=values.device, dtype=torch.float64).index_add_(
        0, run_id.flatten(), torch.ones(n * m, device=values.device, dtype=torch.float64)
    )
    mean_rank_sorted = (sums / sizes.clamp_min(1))[run_id]
    ranks = torch.empty_like(mean_rank_sorted)
    ranks.scatter_(1, perm, mean_rank_sorted)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of rows of ``a`` and ``b`` (flattened from dim 1).

    Returns:
        (N,) float64 in [-1, 1]; NaN where either row is constant (its ranks have no variance).
    """
    if a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
        raise ValueError(
            f"spearman needs two batches of equal size, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    ra = average_ranks(a.detach().flatten(1))
    rb = average_ranks(b.detach().to(a.device).flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    corr = (ra * rb).sum(1) / denom
    return torch.where(denom > 0, corr, torch.full_like(corr, float("nan")))
