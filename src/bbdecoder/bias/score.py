"""The Attention-IoU score itself (Serianni et al., CVPR 2025), vectorised over a batch.

For one image, two non-negative maps ``a`` and ``m``: ``p = a / sum(a)``, ``q = m / sum(m)`` and

    score = sum(p * q) / sum(((p + q) / 2) ** 2)

It is 1 for identical maps, 0 for disjoint supports, invariant to positive scaling of either map,
equals ``4J / (1 + 3J)`` for binary masks with IoU ``J`` and ``4 / (3 + N / k)`` for a uniform map
against a mask of ``k`` of ``N`` pixels. A map that sums to zero has no distribution: the score is NaN.
"""

from __future__ import annotations

import torch

from bbdecoder.attribution.postprocess import minmax_per_sample


def as_map_batch(maps: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a batch of 2-D maps, (N, H, W) or (N, 1, H, W), and return it as (N, H, W)."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of maps (N, H, W), got {type(maps).__name__}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(
            f"{name} must have shape (N, H, W) or (N, 1, H, W), got {tuple(maps.shape)}; "
            "for a single map add the batch dimension with .unsqueeze(0)"
        )
    if maps.dtype == torch.bool or not maps.dtype.is_floating_point:
        maps = maps.float()
    return maps


def _check_non_negative(maps: torch.Tensor, name: str) -> None:
    finite = maps[torch.isfinite(maps)]
    if finite.numel() and bool((finite < 0).any()):
        raise ValueError(
            f"{name} has negative values (min {float(finite.min()):.3g}); Attention-IoU needs non-negative "
            "maps: take .abs() or .clamp_min(0), or min-max scale them (mask_score/heatmap_score do)"
        )


def attention_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Attention-IoU of two batches of non-negative maps, with only the L1 normalisation.

    Args:
        a: (N, H, W) or (N, 1, H, W), non-negative.
        b: the same shape as ``a`` (resize first if needed), non-negative.

    Returns:
        Tensor (N,) in [0, 1], float64 precision internally, NaN where either map sums to zero.
    """
    a = as_map_batch(a, "a")
    b = as_map_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"the two batches of maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; resize them to "
            "one comparison resolution first (mask_score/heatmap_score take `resolution=`)"
        )
    _check_non_negative(a, "a")
    _check_non_negative(b, "b")
    dtype = a.dtype
    p = a.flatten(1).double()
    q = b.to(a.device).flatten(1).double()
    p_sum = p.sum(dim=1, keepdim=True)
    q_sum = q.sum(dim=1, keepdim=True)
    empty = (p_sum[:, 0] <= 0) | (q_sum[:, 0] <= 0)
    p = p / p_sum.clamp_min(torch.finfo(torch.float64).tiny)
    q = q / q_sum.clamp_min(torch.finfo(torch.float64).tiny)
    overlap = (p * q).sum(dim=1)
    union = (((p + q) / 2) ** 2).sum(dim=1)
    score = overlap / union.clamp_min(torch.finfo(torch.float64).tiny)
    score = torch.where(empty, torch.full_like(score, float("nan")), score)
    return score.to(dtype if dtype.is_floating_point else torch.float32)


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale every map to [0, 1] (per map); a constant map becomes all zeros, i.e. empty.

    Args:
        maps: (N, H, W) or (N, 1, H, W).

    Returns:
        (N, H, W).
    """
    maps = as_map_batch(maps, "maps")
    return minmax_per_sample(maps)
