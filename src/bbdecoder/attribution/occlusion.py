"""Occlusion (Zeiler & Fergus 2014): slide a window of baseline values over the input."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from bbdecoder.attribution.perturbation import PerturbationExplainer, broadcast_to_inputs
from bbdecoder.targets import TargetLike


class Occlusion(PerturbationExplainer):
    """Score drop when a window of the input is replaced by a baseline, averaged over the windows.

    ``attribute(x, target, sliding_window_shapes, strides=None, baselines=0.0)``: for every window
    position the score change ``F(x) - F(x with the window set to the baseline)`` is added to each
    element of the window; each element's total is divided by the number of windows that covered it.
    Windows start at ``0, stride, 2 * stride, ...`` until one reaches the end of the dimension; the
    last one may be cut at the border (so every element is covered). This is Captum's ``Occlusion``.
    See :class:`~bbdecoder.attribution.perturbation.PerturbationExplainer` for the constructor.
    """

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        sliding_window_shapes: Sequence[int] | int = 8,
        strides: Sequence[int] | int | None = None,
        baselines: float | torch.Tensor = 0.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Occlusion attribution shaped like ``inputs`` (N, C, *spatial).

        Args:
            sliding_window_shapes: the window over the non-batch dims ``(C, h, w)``, or over the spatial
                dims only ``(h, w)`` (all channels at once), or one int for every spatial dim.
            strides: steps of the window, same forms; default the window itself (no overlap).
            baselines: the occluding value: a number or a tensor broadcastable to ``inputs``.
        """
        backend = self.backend
        x = backend.prepare(inputs)
        rank = x.dim()
        window = _full_shape(backend.user_shape(sliding_window_shapes, rank), x, "sliding_window_shapes")
        step = window if strides is None else _full_shape(backend.user_shape(strides, rank), x, "strides")
        for size, dim, stride in zip(window, x.shape[1:], step, strict=True):
            if not 1 <= size <= dim:
                raise ValueError(f"window {window} does not fit the sample shape {tuple(x.shape[1:])}")
            if stride < 1:
                raise ValueError(f"strides must be >= 1, got {step}")
        background = broadcast_to_inputs(backend.user_array(baselines, rank), x, "baselines")
        starts = [
            [k * stride for k in range(math.ceil((dim - size) / stride) + 1)]
            for dim, size, stride in zip(x.shape[1:], window, step, strict=True)
        ]
        positions = list(itertools.product(*starts))
        n = x.shape[0]
        with self.session():
            base_scores, frozen = self.clean_scores(x, target)

            def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
                rows = torch.arange(start, stop, device=x.device)
                samples = rows % n
                batch = x[samples].clone()
                for index, row in enumerate(range(start, stop)):
                    region = _region(positions[row // n], window)
                    batch[index][region] = background[int(samples[index])][region]
                return batch, samples

            scores = self.score_rows(x, make, n * len(positions), frozen, what="windows")
        drops = (base_scores.to(torch.float64).repeat(len(positions)) - scores).view(len(positions), n)
        total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        counts = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
        shape = (n,) + (1,) * (x.dim() - 1)
        for index, position in enumerate(positions):
            region = _region(position, window)
            total[(slice(None), *region)] += drops[index].view(shape)
            counts[region] += 1
        return backend.to_framework((total / counts).to(x.dtype))


def _region(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + w) for s, w in zip(start, size, strict=True))


def _full_shape(value: Sequence[int] | int, x: torch.Tensor, name: str) -> tuple[int, ...]:
    """A per-non-batch-dim size from an int (spatial dims), a spatial tuple, or a full tuple."""
    sample = tuple(x.shape[1:])
    if isinstance(value, bool):
        raise TypeError(f"{name} cannot be a bool")
    if isinstance(value, int):
        return (sample[0],) + (value,) * (len(sample) - 1) if len(sample) > 1 else (value,)
    parts = tuple(int(v) for v in value)
    if len(parts) == len(sample):
        return parts
    if len(parts) == len(sample) - 1:
        return (sample[0], *parts)
    raise ValueError(
        f"{name} {parts} must give one size per non-batch dim {sample} or per spatial dim {sample[1:]}"
    )
