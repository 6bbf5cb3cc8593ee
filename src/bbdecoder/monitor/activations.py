"""Activation probes: dead units, saturation, variance across channels, channel similarity.

A probe is fed each watched layer's output (detached, inside ``no_grad``) and keeps its running
state on the device; the analyzer reads it once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

SaturationFn = Callable[[torch.Tensor], torch.Tensor]


def saturation_test(module: nn.Module, eps: float) -> SaturationFn | None:
    """The boolean test "this activation is saturated" for the module's type, or ``None``.

    Sigmoid: ``y < eps`` or ``y > 1 - eps``; Tanh: ``|y| > 1 - eps``; ReLU: ``y == 0``;
    ReLU6 / Hardtanh: at either bound; Hardsigmoid: 0 or 1.
    """
    if isinstance(module, nn.Sigmoid):
        return lambda y: (y < eps) | (y > 1 - eps)
    if isinstance(module, nn.Tanh):
        return lambda y: y.abs() > 1 - eps
    if isinstance(module, nn.ReLU):
        return lambda y: y == 0
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        lo, hi = float(module.min_val), float(module.max_val)
        return lambda y: (y <= lo) | (y >= hi)
    if isinstance(module, nn.Hardsigmoid):
        return lambda y: (y <= 0) | (y >= 1)
    return None


def channels_first(output: torch.Tensor, dim: int) -> torch.Tensor:
    """``(C, rest)`` view of ``output`` with channel dimension ``dim`` first (1-D: one channel each)."""
    if output.dim() == 1:
        return output.reshape(-1, 1)
    return output.movedim(dim, 0).reshape(output.shape[dim], -1)


class ActivationProbe:
    """Running activation state of one layer over the current epoch.

    - ``max``: per channel, the largest activation seen; a unit is **dead** when this is
      ``<= threshold`` (i.e. its activation was ``<= threshold`` for every sample and position).
    - saturated / total element counts (for activation modules with a saturation test).
    - ``channel_var``: population variance, across channels, of each channel's mean activation,
      summed over forwards (divide by ``forwards``).
    """

    def __init__(self, module: nn.Module, threshold: float, eps: float, dim: int) -> None:
        self.threshold = threshold
        self.dim = dim
        self.saturation = saturation_test(module, eps)
        self.reset()

    def reset(self) -> None:
        self.max: torch.Tensor | None = None
        self.saturated: torch.Tensor | None = None
        self.total = 0
        self.channel_var: torch.Tensor | None = None
        self.forwards = 0

    def update(self, output: torch.Tensor) -> None:
        y = output.detach()
        ch = channels_first(y, self.dim)
        cmax = ch.amax(dim=1)
        self.max = cmax if self.max is None or self.max.shape != cmax.shape else torch.maximum(self.max, cmax)
        cvar = ch.float().mean(dim=1).var(correction=0)
        self.channel_var = cvar if self.channel_var is None else self.channel_var + cvar
        self.forwards += 1
        if self.saturation is not None:
            sat = self.saturation(y).sum()
            self.saturated = sat if self.saturated is None else self.saturated + sat
            self.total += y.numel()

    def dead_mask(self) -> torch.Tensor | None:
        """Boolean ``(C,)``: channels whose activation never exceeded the threshold (``None``: no data)."""
        return None if self.max is None else self.max <= self.threshold


def channel_similarity(activation: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Cosine similarity between the channels of ``activation`` along ``dim``: ``(C, C)``.

    Each channel is flattened over every other dimension (samples and positions); a channel that is
    all zeros has similarity 0 with everything (the ``get_sim`` of the original BBDecoder).
    """
    ch = channels_first(activation.detach(), dim).double()
    unit = ch / ch.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T
