"""An activation probe's update in one read of the output: the fused kernel's ``probe_update``.

The torch path of :meth:`~bbdecoder.monitor.activations.ActivationProbe.update` makes about ten
small torch calls per forward (per-channel ``amax`` and mean, their variance, the state updates, the
saturation comparisons); right after a convolution each starts from cold caches (40-70 us), and the
reductions each read the output again. On the CPU, for an output dense in memory, the C kernel
(:mod:`~bbdecoder.monitor.cpu_reductions`) reads it once and updates the probe's state tensors in
place through NumPy views of them: the per-channel maximum (NaN propagates, as ``amax``), the
population variance of the channel means (float64 sums, where torch's mean is float32: the two
agree to ~1e-7), the saturation count by the same disjoint comparisons (the bound in the output's
dtype, NaN never counted) and the forward count.

The layouts it takes, with the probe's channel dimension ``d``: C-contiguous (``(outer, C, inner)``
with ``outer`` the dims before ``d`` and ``inner`` those after; 1-D outputs are one channel per
element, as on the torch path) and channels-last 4-D outputs with ``d = 1``. Anything else, other
devices, half precision and ``torch.compile``'s tracing keep the torch path.
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
    tensor is replaced (a new epoch's allocation, a merge that assigns)."""

    def __init__(self, rules: list[tuple[str, float]]) -> None:
        self._rules = [(RULE_OPS[op], bound) for op, bound in rules]  # the saturation rule, in op codes
        self._of: tuple[torch.Tensor, ...] = ()
        self._maxima: list[np.ndarray] = []
        self._scalars: list[np.ndarray] = []

    def update(self, probe: Any, y: torch.Tensor) -> bool:
        """Add ``y`` to ``probe``'s state through the kernel; False where the torch path must."""
        kernels = cpu_reductions.FUSED
        if kernels is None or torch.compiler.is_compiling() or y.device.type != "cpu" or not y.numel():
            return False
        layout = channel_layout(y, probe.dim)
        if layout is None:
            return False
        try:
            array = y.numpy()  # raises for bfloat16, conjugate or negative views
        except (RuntimeError, TypeError):
            return False
        if array.dtype not in (np.float32, np.float64):
            return False
        channels, inner = layout
        if probe.max is None or probe.max.shape[0] != channels:
            probe.allocate(channels, y.device)
        state = (probe.max, probe.saturated, probe.total, probe.channel_var, probe.forwards)
        if len(self._of) != len(state) or any(a is not b for a, b in zip(self._of, state, strict=True)):
            if any(t is None or t.device.type != "cpu" for t in state):
                return False  # state left on another device: the torch path says what is wrong
            self._of = state
            self._maxima = [state[0].numpy()]
            self._scalars = [t.numpy() for t in state[1:]]
        threads = cpu_reductions.kernel_threads()  # the forward's thread: torch's pool runs the parts
        kernels.probe_update(array, channels, inner, self._rules, self._maxima, self._scalars, threads)
        return True
