"""An activation probe's update in one read of the output: the fused kernel's ``probe_update``.

The torch path of :meth:`~bbdecoder.monitor.activations.ActivationProbe.update` makes about ten
small torch calls per forward (per-channel ``amax`` and mean, their variance, the state updates, the
saturation comparisons); right after a convolution each starts from cold caches (40-70 us), and the
reductions each read the output again. On the CPU, for an output dense in memory, the C kernel
(:mod:`~bbdecoder.monitor.cpu_reductions`) reads it once, from its address, and updates the probe's
state tensors in place through NumPy views of them: the per-channel maximum (NaN propagates, as
``amax``), the population variance of the channel means (float64 sums, where torch's mean is
float32: the two agree to ~1e-7), the saturation count by the same disjoint comparisons (the bound
in the output's dtype, NaN never counted) and the forward count.

The layouts it takes, with the probe's channel dimension ``d``: C-contiguous (``(outer, C, inner)``
with ``outer`` the dims before ``d`` and ``inner`` those after; 1-D outputs are one channel per
element, as on the torch path) and channels-last 4-D outputs with ``d = 1``. Anything else, other
devices, half precision, tensor subclasses and ``torch.compile``'s tracing keep the torch path.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bbdecoder.monitor import cpu_reductions

__all__ = ["RULE_OPS", "FusedProbeState"]

RULE_OPS = {"lt": 0, "le": 1, "gt": 2, "ge": 3}
"""The kernel's codes of a saturation rule's comparisons."""


def channel_layout(y: torch.Tensor, dim: int) -> tuple[int, int] | None:
    """``(channels, inner)`` of ``y`` in memory order, or ``None`` where the kernel cannot read it."""
    d = dim % y.dim()
    if y.is_contiguous():
        return y.shape[d], math.prod(y.shape[d + 1 :])
    if y.dim() == 4 and d == 1 and y.is_contiguous(memory_format=torch.channels_last):
        return y.shape[1], 1
    return None


class FusedProbeState:
    """The NumPy views of one probe's state tensors the kernel writes, made again whenever a state
    tensor is replaced (a new epoch's allocation, a merge that assigns), and the layout of the last
    output shape and strides seen.

    A probe runs inside the forward pass, right after the layer, where the interpreter's caches are
    cold and each torch attribute read costs microseconds: the output goes to the kernel by its
    ``data_ptr()`` (no ``detach()``, no NumPy view, no ``no_grad`` block), its layout is computed once
    per shape, and the state is checked by identity, one attribute each."""

    def __init__(self, rules: list[tuple[str, float]]) -> None:
        self._rules = [(RULE_OPS[op], bound) for op, bound in rules]  # the saturation rule, in op codes
        self._of: tuple[torch.Tensor | None, ...] = (None,) * 5
        self._maxima: list[np.ndarray] = []
        self._scalars: list[np.ndarray] = []
        self._layout_of: tuple[torch.Size, tuple[int, ...]] | None = None
        self._layout: tuple[int, int] | None = None

    def update(self, probe: Any, y: torch.Tensor) -> bool:
        """Add ``y`` to ``probe``'s state through the kernel; False where the torch path must."""
        kernels = cpu_reductions.FUSED
        if kernels is None or torch.compiler.is_compiling() or type(y) is not torch.Tensor or not y.is_cpu:
            return False  # a subclass (a wrapper without storage) keeps the torch path
        dtype = y.dtype
        if (dtype is not torch.float32 and dtype is not torch.float64) or y.is_neg():
            return False
        try:
            address = y.data_ptr()
        except RuntimeError:  # no storage: a torch.func transform's wrapper (before any state changes)
            return False
        key = (y.shape, y.stride())
        if key != self._layout_of:
            self._layout_of, self._layout = key, channel_layout(y, probe.dim)
        elements = y.numel()
        if self._layout is None or not elements:
            return False
        channels, inner = self._layout
        if probe.max is None or probe.max.shape[0] != channels:
            probe.allocate(channels, y.device)
        of = self._of
        if (
            of[0] is not probe.max
            or of[1] is not probe.saturated
            or of[2] is not probe.total
            or of[3] is not probe.channel_var
            or of[4] is not probe.forwards
        ):
            state = (probe.max, probe.saturated, probe.total, probe.channel_var, probe.forwards)
            if any(t is None or t.device.type != "cpu" for t in state):
                return False  # state left on another device: the torch path says what is wrong
            self._of = state
            self._maxima = [state[0].numpy()]
            self._scalars = [t.numpy() for t in state[1:]]
        threads = cpu_reductions.kernel_threads()  # the forward's thread: torch's pool runs the parts
        kernels.probe_update_at(
            address, elements, dtype is torch.float64, channels, inner, self._rules, self._maxima,
            self._scalars, threads,
        )  # fmt: skip
        return True
