"""Baselines (reference inputs) for path methods such as Integrated Gradients.

Baselines live in **pixel space**, the space of the tensor you pass to ``attribute``. When the model
expects normalised input, do not normalise the images yourself: pass the raw images and give the
explainer ``input_transform=Normalize(mean, std)``. Then ``"black"`` is a black image; a zero *after*
normalisation would be the dataset mean colour, not black.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

BaselineSpec = str | float | int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

NAMED_BASELINES = ("black", "white", "uniform", "blur")


def make_baseline(
    spec: BaselineSpec, inputs: torch.Tensor, seed: int = 0, *, blur_sigma: float | None = None
) -> torch.Tensor:
    """The baseline for ``inputs``, shaped, typed and placed like ``inputs`` (N, C, *spatial).

    Args:
        spec: ``"black"`` (zeros), ``"white"`` (ones), ``"uniform"`` (seeded uniform noise over each
            sample's own ``[min, max]``), ``"blur"`` (a Gaussian blur of ``inputs``, see
            :func:`gaussian_blur`), a number (that constant everywhere), a tensor broadcastable to
            ``inputs``, or a callable ``f(inputs) -> Tensor`` broadcastable to ``inputs``.
        inputs: the batch being explained, in pixel space.
        seed: seeds the ``"uniform"`` noise (a ``torch.Generator`` on the inputs' device).
        blur_sigma: standard deviation in pixels for ``"blur"``; default :func:`default_blur_sigma`.

    Returns:
        A new tensor (never a view of ``inputs``) with ``inputs``' shape, dtype and device, detached.
    """
    x = inputs.detach()
    if isinstance(spec, str):
        if spec == "black":
            return torch.zeros_like(x)
        if spec == "white":
            return torch.ones_like(x)
        if spec == "uniform":
            return _uniform_noise(x, seed)
        if spec == "blur":
            return gaussian_blur(x, default_blur_sigma(x) if blur_sigma is None else blur_sigma)
        raise ValueError(
            f"unknown baseline {spec!r}; use one of {', '.join(NAMED_BASELINES)}, a number, a tensor "
            "broadcastable to the inputs, or a callable f(inputs) -> tensor"
        )
    if isinstance(spec, bool):
        raise TypeError("a baseline cannot be a bool; use 0.0 or 1.0")
    if isinstance(spec, (int, float)):
        return torch.full_like(x, float(spec))
    if isinstance(spec, torch.Tensor):
        return _broadcast(spec, x, "tensor")
    if callable(spec):
        made = spec(x)
        if not isinstance(made, torch.Tensor):
            raise TypeError(f"a baseline callable must return a tensor, got {type(made).__name__}")
        return _broadcast(made, x, "callable's result")
    raise TypeError(f"a baseline must be a name, a number, a tensor or a callable, got {type(spec).__name__}")


def _broadcast(baseline: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    try:
        expanded = torch.broadcast_to(baseline.detach(), x.shape)
    except RuntimeError:
        raise ValueError(
            f"the baseline {what} has shape {tuple(baseline.shape)}, which does not broadcast to the "
            f"inputs' shape {tuple(x.shape)}; give one baseline per sample (N, ...) or one for all (1, ...)"
        ) from None
    return expanded.to(device=x.device, dtype=x.dtype).clone()


def _uniform_noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=x.device).manual_seed(seed)
    flat = x.reshape(x.shape[0], -1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    low = flat.min(dim=1).values.view(shape)
    high = flat.max(dim=1).values.view(shape)
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return low + noise * (high - low)


def default_blur_sigma(x: torch.Tensor) -> float:
    """One tenth of the smallest spatial side, at least 0.5 pixel (e.g. 22.4 px for 224 x 224 images)."""
    _require_spatial(x)
    return max(0.5, 0.1 * min(x.shape[2:]))


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius ``ceil(3 * sigma)``, shape ``(2 * radius + 1,)``."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"blur sigma must be a positive finite number of pixels, got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``x`` (N, C, *spatial), any number of spatial dims.

    Each spatial axis is convolved with the same 1-D kernel, channel by channel (depthwise), with
    replicate padding, so the output has ``x``'s shape and a constant image stays constant.
    """
    _require_spatial(x)
    kernel = gaussian_kernel(float(sigma), x.dtype, x.device)
    radius = (kernel.numel() - 1) // 2
    weight = kernel.view(1, 1, -1)
    out = x.detach()
    for axis in range(2, x.dim()):
        moved = out.movedim(axis, -1)
        lines = moved.reshape(-1, 1, moved.shape[-1])
        padded = F.pad(lines, (radius, radius), mode="replicate")
        blurred = F.conv1d(padded, weight).reshape(moved.shape)
        out = blurred.movedim(-1, axis)
    return out.contiguous()


def _require_spatial(x: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(
            f"a blur baseline needs inputs with spatial dims (N, C, H, ...), got shape {tuple(x.shape)}; "
            "use 'black', a number or a tensor baseline for flat features"
        )
