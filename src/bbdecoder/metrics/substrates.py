"""What replaces removed pixels: fixed substrates and ROAD-style noisy linear imputation.

ROAD (Rong et al., ICML 2022) fills each removed pixel with the weighted mean of its 8 neighbours
(direct neighbours 1/6, diagonal ones 1/12), solved jointly for all removed pixels with the kept
ones fixed, plus small Gaussian noise, so that the removal pattern itself leaks little information.
Here the linear system is solved by batched conjugate gradients with convolutions on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from bbdecoder.attribution.baselines import default_blur_sigma, gaussian_blur

SubstrateSpec = str | float | int | torch.Tensor
FIXED_SUBSTRATES = ("zero", "blur", "mean")
IMPUTING_SUBSTRATES = ("road",)

_NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def fixed_substrate(
    spec: SubstrateSpec, inputs: torch.Tensor, *, blur_sigma: float | None = None
) -> torch.Tensor:
    """A substrate shaped like ``inputs`` (N, C, H, W): ``"zero"``, ``"blur"``, ``"mean"`` (per image and
    channel), a number, or a tensor broadcastable to ``inputs``."""
    x = inputs.detach()
    if isinstance(spec, str):
        if spec == "zero":
            return torch.zeros_like(x)
        if spec == "blur":
            return gaussian_blur(x, default_blur_sigma(x) if blur_sigma is None else blur_sigma)
        if spec == "mean":
            return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x).clone()
        raise ValueError(
            f"unknown substrate {spec!r}; use one of {', '.join(FIXED_SUBSTRATES + IMPUTING_SUBSTRATES)}, "
            "a number or a tensor broadcastable to the inputs"
        )
    if isinstance(spec, bool):
        raise TypeError("a substrate cannot be a bool; use 0.0 or 1.0")
    if isinstance(spec, (int, float)):
        return torch.full_like(x, float(spec))
    if isinstance(spec, torch.Tensor):
        try:
            return torch.broadcast_to(spec.detach().to(x), x.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"the substrate has shape {tuple(spec.shape)}, which does not broadcast to the inputs' "
                f"shape {tuple(x.shape)}"
            ) from None
    raise TypeError(f"a substrate must be a name, a number or a tensor, got {type(spec).__name__}")


def noisy_linear_impute(
    images: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels of ``images``.

    Args:
        images: (B, C, H, W).
        removed: (B, 1, H, W) or (B, C, H, W) boolean, True where a pixel is removed.
        noise: standard deviation of the Gaussian noise added to imputed pixels (0 disables it).
        tol: conjugate-gradient stopping tolerance on the residual, relative to the right-hand side.
        max_iter: CG iterations at most (default ``4 * max(H, W) + 20``).

    Returns:
        (B, C, H, W): kept pixels unchanged, removed ones imputed. A map with every pixel removed has
        nothing to impute from and gets zeros (plus noise).
    """
    if images.dim() != 4:
        raise ValueError(f"ROAD imputation needs images (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    mask = torch.broadcast_to(removed.to(torch.bool), images.shape).reshape(b * c, 1, h, w)
    x = images.detach().reshape(b * c, 1, h, w)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    r_mask = mask.to(dtype)
    kernel = _NEIGHBOURS.to(device=x.device, dtype=dtype).view(1, 1, 3, 3)

    def conv(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel, padding=1)

    degree = conv(torch.ones(1, 1, h, w, device=x.device, dtype=dtype))

    def operator(v: torch.Tensor) -> torch.Tensor:
        # L_RR v with L = D - K the weighted graph Laplacian, restricted to removed pixels (SPD there).
        return r_mask * (degree * v - conv(r_mask * v))

    rhs = r_mask * conv(x * (1 - r_mask))
    v = torch.zeros_like(x)
    residual = rhs - operator(v)
    direction = residual.clone()
    rs = (residual * residual).flatten(1).sum(1)
    threshold = (tol**2) * (rhs * rhs).flatten(1).sum(1).clamp_min(torch.finfo(dtype).tiny)
    tiny = torch.finfo(dtype).tiny
    for _ in range(max_iter if max_iter is not None else 4 * max(h, w) + 20):
        if bool((rs <= threshold).all()):
            break
        applied = operator(direction)
        curvature = (direction * applied).flatten(1).sum(1)
        alpha = torch.where(curvature > tiny, rs / curvature.clamp_min(tiny), torch.zeros_like(rs))
        v = v + alpha.view(-1, 1, 1, 1) * direction
        residual = residual - alpha.view(-1, 1, 1, 1) * applied
        rs_new = (residual * residual).flatten(1).sum(1)
        beta = torch.where(rs > tiny, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        direction = residual + beta.view(-1, 1, 1, 1) * direction
        rs = rs_new
    if noise > 0:
        v = v + noise * torch.randn(v.shape, generator=generator, device=v.device, dtype=dtype)
    out = torch.where(mask, v, x)
    return out.reshape(b, c, h, w).to(images.dtype)


def is_imputing(spec: Any) -> bool:
    return isinstance(spec, str) and spec in IMPUTING_SUBSTRATES
