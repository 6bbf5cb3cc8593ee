"""Map post-processing shared by FullGrad, Simple FullGrad and Grad-CAM."""

from __future__ import annotations

import torch
from torch.nn import functional as F

_INTERP_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def channel_sum_minmax(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``sum_c psi(|values|)``, shape (N, 1, *spatial), psi a per-sample min-max over (C, *spatial).

    psi(v) = (v - min) / (max - min + eps) as in the FullGrad reference. Because psi is affine per
    sample, summing over channels first is exact: ``(sum_c v - C * min) / (max - min + eps)``.
    """
    magnitude = values.abs()
    low, high = _per_sample_min_max(magnitude)
    channels = values.shape[1]
    shape = (-1,) + (1,) * (values.dim() - 1)
    summed = magnitude.sum(dim=1, keepdim=True)
    return (summed - channels * low.view(shape)) / (high - low + eps).view(shape)


def resize_to(maps: torch.Tensor, size: tuple[int, ...], *, align_corners: bool) -> torch.Tensor:
    """(Bi/tri)linear resize of (N, C, *spatial) maps to ``size``; a no-op when already that size."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    mode = _INTERP_MODES.get(len(size))
    if mode is None:
        raise ValueError(f"cannot resize maps with {len(size)} spatial dimensions")
    return F.interpolate(maps, size=size, mode=mode, align_corners=align_corners)


def minmax_per_sample(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each sample's map to [0, 1]; a constant map becomes all zeros (never NaN)."""
    low, high = _per_sample_min_max(maps)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    span = (high - low).view(shape)
    scaled = (maps - low.view(shape)) / span.clamp_min(eps)
    return torch.where(span > eps, scaled, torch.zeros_like(scaled))


def _per_sample_min_max(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Separate amin/amax: torch.aminmax(x, dim=1) takes an unvectorised path on CPU (about 50x slower
    # for one long row in torch 2.13/2.14).
    flat = values.flatten(1)
    return flat.amin(dim=1), flat.amax(dim=1)
