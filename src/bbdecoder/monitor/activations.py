"""Activation probes: dead units, saturation, variance across channels, channel similarity.

A probe is fed each watched layer's output (detached, inside ``no_grad``) and keeps its running
state in tensors updated **in place** (no Python counters, no re-assigned attributes), so a hook
traced by ``torch.compile`` adds no guard that changes from one step to the next; the analyzer
reads the state once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bbdecoder.monitor.element_counts import MaskBuffer, count
from bbdecoder.monitor.probe_kernel import FusedProbeState
from bbdecoder.monitor.probe_state import ACTIVATION_STATE, StatefulProbe

SaturationFn = Callable[[torch.Tensor], torch.Tensor]
SaturationCount = Callable[[torch.Tensor, MaskBuffer | None], int | torch.Tensor]

RECTIFIERS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Threshold,
)
"""Activation functions with a "dead" regime (a unit whose output is never above the threshold)."""

ACTIVATION_FUNCTIONS: tuple[type[nn.Module], ...] = (
    *RECTIFIERS,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.GLU,
)
"""Modules watched by ``activations=True``."""

CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Dropout2d,
    nn.Dropout3d,
)
"""Layers whose outputs are ``(N, C, ...)``; every other layer's units are along the last dim
(``Linear``, ``LayerNorm``, ``Embedding``, attention: ``(N, L, D)``)."""


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


def saturation_rules(module: nn.Module, eps: float) -> list[tuple[str, float]] | None:
    """:func:`saturation_test`'s rule as disjoint comparisons ``(op, bound)``, ``op`` in ``lt``,
    ``le`` (at most one) and ``gt``, ``ge`` (at most one), or ``None``."""
    if isinstance(module, nn.Sigmoid):
        return [("lt", eps), ("gt", 1 - eps)]
    if isinstance(module, nn.Tanh):  # |y| > 1 - eps
        return [("gt", 1 - eps), ("lt", -(1 - eps))]
    if isinstance(module, nn.ReLU):  # y == 0: never below it
        return [("le", 0.0)]
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return [("le", float(module.min_val)), ("ge", float(module.max_val))]
    if isinstance(module, nn.Hardsigmoid):
        return [("le", 0.0), ("ge", 1.0)]
    return None


def saturation_count(module: nn.Module, eps: float) -> SaturationCount | None:
    """The number of saturated elements by :func:`saturation_test`'s rule, exactly (a NaN is never
    saturated), as the disjoint comparisons of :func:`saturation_rules` counted by
    :func:`~bbdecoder.monitor.element_counts.count`. The returned function takes the output and an
    optional :class:`~bbdecoder.monitor.element_counts.MaskBuffer` (the CPU path's reused buffer)."""
    rules = saturation_rules(module, eps)
    if rules is None:
        return None

    def saturated(y: torch.Tensor, buffer: MaskBuffer | None = None) -> int | torch.Tensor:
        total: int | torch.Tensor = 0
        for op, bound in rules:
            total = total + count(y, op, bound, buffer)
        return total

    return saturated


def channels_first(output: torch.Tensor, dim: int) -> torch.Tensor:
    """``(C, rest)`` view of ``output`` with channel dimension ``dim`` first (1-D: one channel each)."""
    if output.dim() == 1:
        return output.reshape(-1, 1)
    return output.movedim(dim, 0).reshape(output.shape[dim], -1)


class ActivationProbe(StatefulProbe):
    """Running activation state of one layer over the current epoch (all tensors, updated in place).

    - ``max``: per channel, the largest activation seen; a unit is **dead** when this is
      ``<= threshold`` (its activation was ``<= threshold`` for every sample and position).
      Only counted when ``dead`` is true (rectifiers, or a layer the user named).
    - ``saturated`` / ``total``: element counts (for activation modules with a saturation test).
    - ``channel_var``: population variance, across channels, of each channel's mean activation,
      summed over forwards (divide by ``forwards``).

    The state and how it merges across ranks is declared in ``STATE``
    (:data:`~bbdecoder.monitor.probe_state.ACTIVATION_STATE`).
    """

    STATE = ACTIVATION_STATE

    def __init__(self, module: nn.Module, threshold: float, eps: float, dim: int, *, dead: bool) -> None:
        self.threshold = threshold
        self.dim = dim
        self.dead = dead
        self.saturation = saturation_count(module, eps)
        self.fused = FusedProbeState(saturation_rules(module, eps) or [])  # the same rule, for the kernel
        self.max: torch.Tensor | None = None
        self.saturated: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.channel_var: torch.Tensor | None = None
        self.forwards: torch.Tensor | None = None

    @property
    def seen(self) -> bool:
        """State exists (allocated up front from the weights, or by the first forward)."""
        return self.max is not None

    def reset(self) -> None:
        """Start a new epoch: the same tensors, refilled."""
        if self.max is None:
            return
        assert self.saturated is not None and self.total is not None
        assert self.channel_var is not None and self.forwards is not None
        self.max.fill_(-float("inf"))
        for t in (self.saturated, self.total, self.channel_var, self.forwards):
            t.zero_()

    def allocate(self, channels: int, device: torch.device) -> None:
        """Create the state for ``channels`` units (done before the first forward when the count is
        known from the weights; otherwise on the first forward)."""
        self.max = torch.full((channels,), -float("inf"), dtype=torch.float32, device=device)
        self.saturated = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.channel_var = torch.zeros((), dtype=torch.float64, device=device)
        self.forwards = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, output: torch.Tensor, buffer: MaskBuffer | None = None) -> None:
        """Add one forward's output (``buffer``: the saturation count's reused CPU buffer; given,
        a dense float CPU output goes through the fused kernel in one read, see
        :mod:`~bbdecoder.monitor.probe_kernel`). Needs no ``no_grad`` block around it: the output
        is only read. The forwards ``torch.func`` transforms make (``vmap``, ``grad``: the output a
        wrapper without storage) are not the model's own and are left out."""
        if buffer is not None and self.fused.update(self, output):
            return
        with torch.no_grad():
            self._update_in_torch(output.detach().resolve_neg(), buffer)  # NumPy reads no negative view

    def _update_in_torch(self, y: torch.Tensor, buffer: MaskBuffer | None) -> None:
        if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(y):
            return  # (dynamo cannot trace the check; a traced forward is the model's own)
        if y.dim() == 1:
            channel_max, channel_mean = y, y.float()
        else:  # reduce over every other dim in place of a channels-first copy
            others = tuple(d for d in range(y.dim()) if d != self.dim % y.dim())
            channel_max = y.amax(dim=others)
            channel_mean = y.float().mean(dim=others)
        if self.max is None or self.max.shape[0] != channel_max.shape[0]:
            self.allocate(channel_max.shape[0], y.device)
        assert self.max is not None and self.saturated is not None and self.total is not None
        assert self.channel_var is not None and self.forwards is not None
        torch.maximum(self.max, channel_max.float(), out=self.max)
        self.channel_var.add_(channel_mean.var(correction=0))
        self.forwards.add_(1)
        if self.saturation is not None:
            self.saturated.add_(self.saturation(y, buffer))
            self.total.add_(y.numel())

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
