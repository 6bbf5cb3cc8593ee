"""The comparison resolution: both maps must live on one grid, and the grid changes the score.

Attention maps are resized bilinearly (continuous values); masks are resized by area averaging when
shrunk (a pixel partly inside a region keeps that fraction) and by nearest neighbour when enlarged (a
binary mask stays binary).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

Resolution = str | int | tuple[int, int]


def resolve_resolution(
    resolution: Resolution, first: tuple[int, int], second: tuple[int, int], names: tuple[str, str]
) -> tuple[int, int]:
    """The (H, W) to compare at: ``names[0]``/``names[1]`` pick one input's grid, or an explicit size."""
    if isinstance(resolution, str):
        if resolution == names[0]:
            return first
        if resolution == names[1]:
            return second
        raise ValueError(
            f"resolution={resolution!r} is not understood; use {names[0]!r}, {names[1]!r}, an int or (H, W)"
        )
    if isinstance(resolution, bool):
        raise TypeError("resolution cannot be a bool")
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(int(s) for s in resolution)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"resolution must be a positive (H, W), got {resolution!r}")
    return (int(size[0]), int(size[1]))


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of continuous maps (N, H, W) -> (N, *size); values stay non-negative."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    out = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return out.clamp_min(0)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize masks (N, H, W): area average when shrinking, nearest when enlarging."""
    if tuple(masks.shape[-2:]) == size:
        return masks.float()
    masks = masks[:, None].float()
    if size[0] <= masks.shape[-2] and size[1] <= masks.shape[-1]:
        return F.interpolate(masks, size=size, mode="area")[:, 0]
    return F.interpolate(masks, size=size, mode="nearest")[:, 0]
