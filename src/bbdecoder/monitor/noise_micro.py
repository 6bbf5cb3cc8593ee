"""The two-batch gradient noise scale from the micro-batches of accumulated steps (McCandlish et
al. 2018, appendix A.1), for ``Analyzer(..., micro_noise_scale=True)``.

A step that accumulates ``K >= 2`` micro-batches of ``b`` samples each (the loss of each divided
by ``K``, as Lightning's ``accumulate_grad_batches`` does) holds ``K`` small-batch gradients
``G_k`` and their mean ``G`` (a batch of ``K b``): the gradient hook of every tracked parameter
reads the increment of its accumulated gradient after each backward (``G_k / K``), so
``||G_k||^2`` costs one subtraction and one norm per tensor and micro-step, and one copy of the
gradients kept between micro-steps. :func:`~bbdecoder.monitor.noise_scale.from_parts` turns them
into unbiased ``tr(Sigma)`` and ``|G|^2``. Works where per-sample gradients do not (BatchNorm in
training mode: then each micro-batch's gradient is that of its own batch statistics).

Stored per accumulated step for the whole model (``layer_id`` -1, ``param`` ``"*"``):
``noise_trace_micro``, ``noise_grad_sq_micro``, ``noise_scale_micro`` and ``noise_scale_micro_ema``.
Nothing is stored for a step with one micro-batch; NaN (and the unchanged smoothed value) when the
micro-batches differ in size (samples counted from dim 0 of the first tensor given to the model's
forward in training and grad mode) or a tracked tensor missed a micro-step. Under a ``GradScaler``
the gradients are unscaled first (the Analyzer's scale).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.monitor.noise_scale import NoiseScaleEMA, from_parts

MICRO_NOISE_STATS: tuple[str, ...] = (
    "noise_trace_micro",
    "noise_grad_sq_micro",
    "noise_scale_micro",
    "noise_scale_micro_ema",
)


class MicroBatchNoiseScale:
    """A row source for the Analyzer: the two-batch noise scale over the micro-batches of a step.

    Args:
        model: the model (a forward pre-hook counts the samples of each training forward).
        params: the tracked parameter tensors.
        writer: the run writer (``series_id``/``stat_id``).
        hooks: where the hooks are registered (removed with it).
        current_step: the number of the step being accumulated (the Analyzer's ``current_step``):
            a new number starts a new step, also after steps that were not recorded (``every=``).
        inv_scale: the factor that unscales the gradients as they are when the step is recorded
            (a ``GradScaler``'s ``1 / scale``, 1 after ``scaler.unscale_``).
        backward_scale: the factor that unscales the gradients as the backward passes left them.
        ema: decay of the smoothed value.
        tensorboard: a :class:`~bbdecoder.monitor.tensorboard.TensorBoardLogger` that gets the rows live.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor],
        writer: Any,
        hooks: HookManager,
        current_step: Callable[[], int],
        *,
        inv_scale: Callable[[], float] | None = None,
        backward_scale: Callable[[], float] | None = None,
        ema: float = 0.9,
        tensorboard: Any = None,
    ) -> None:
        self._params = [p for p in params if p.requires_grad]
        self._current_step = current_step
        self._inv_scale = inv_scale
        self._backward_scale = backward_scale
        self.ema = NoiseScaleEMA(ema)
        self.tensorboard = tensorboard
        self._series = writer.series_id(-1, "*")
        self._stats = [writer.stat_id(s) for s in MICRO_NOISE_STATS]
        self._step: int | None = None
        self._prev: list[torch.Tensor | None] = [None] * len(self._params)
        self._fired = [0] * len(self._params)
        self._micro_sq: list[torch.Tensor] = []  # per micro-step: sum over tensors of ||increment||^2
        self._sizes: list[int] = []
        for i, p in enumerate(self._params):
            hooks.add(p.register_post_accumulate_grad_hook(self._grad_hook(i)))
        hooks.forward_pre_hook(model, self._count)

    def _new_step_check(self) -> None:
        now = self._current_step()
        if now != self._step:
            self._step = now
            self._prev = [None] * len(self._params)
            self._fired = [0] * len(self._params)
            self._micro_sq, self._sizes = [], []

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            self._new_step_check()
            first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
            if first is not None:
                self._sizes.append(int(first.shape[0]))

    def _grad_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._new_step_check()
            grad = param.grad
            if grad is None:
                return
            prev = self._prev[i]
            increment = grad if prev is None else grad - prev
            sq = torch.linalg.vector_norm(increment.detach(), dtype=torch.float64).pow(2)
            k = self._fired[i]
            if k == len(self._micro_sq):
                self._micro_sq.append(sq)
            else:
                self._micro_sq[k] = self._micro_sq[k] + sq.to(self._micro_sq[k].device)
            self._fired[i] = k + 1
            if prev is None:
                self._prev[i] = grad.detach().clone()
            else:
                prev.copy_(grad.detach())

        return hook

    def rows(self, step: int, epoch: int) -> list[tuple[int, int, int, int, float]]:
        """This step's rows (none for a step of one micro-batch)."""
        micro = len(self._micro_sq)
        if micro < 2:
            return []
        fired = {f for f, p in zip(self._fired, self._params, strict=True) if p.grad is not None}
        sizes = set(self._sizes)
        s = self._inv_scale() if self._inv_scale is not None else 1.0
        b = self._backward_scale() if self._backward_scale is not None else 1.0
        values: list[float]
        if fired == {micro} and len(sizes) == 1 and len(self._sizes) == micro:
            # increments are G_k / K (each micro-loss divided by K): ||G_k||^2 = K^2 ||increment||^2
            parts = [float(t) * (micro * b) ** 2 for t in self._micro_sq]
            union = sum(
                float(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)) ** 2
                for p in self._params
                if p.grad is not None
            ) * (s * s)
            estimate = from_parts(parts, float(sizes.pop()), union)
            values = [estimate.trace, estimate.grad_sq, estimate.noise_scale, self.ema.update(estimate)]
        else:
            values = [math.nan] * 3 + [self.ema.value]
        if self.tensorboard is not None:
            from bbdecoder.monitor.tensorboard import stat_tag

            self.tensorboard.record_scalars(
                step, {stat_tag(n, "*"): v for n, v in zip(MICRO_NOISE_STATS, values, strict=True)}
            )
        self._step = None  # the next hook starts the next step
        return [
            (step, epoch, self._series, sid, float(v)) for sid, v in zip(self._stats, values, strict=True)
        ]


def micro_noise_source(analyzer: Any) -> MicroBatchNoiseScale:
    """The row source of ``Analyzer(..., micro_noise_scale=True)`` (it holds the Analyzer weakly);
    ``ValueError`` under a rank sync."""
    if analyzer.sync is not None:
        raise ValueError(
            "micro_noise_scale is single-process: under DDP a rank's micro-steps see local gradients and "
            "the last one the all-reduced one; use DistributedAnalyzer(..., noise_scale=True) (ranks) or "
            "per_sample=k"
        )
    ref = weakref.ref(analyzer)

    def step() -> int:
        alive = ref()
        return alive.current_step if alive is not None else -1

    def inv_scale() -> float:  # of the gradients now (1 once the scaler has unscaled them)
        alive = ref()
        return alive._inv_scale() if alive is not None else 1.0

    def backward_scale() -> float:  # of the gradients as the backward passes left them
        alive = ref()
        scaler = alive.scaler if alive is not None else None
        return 1.0 / float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    return MicroBatchNoiseScale(
        analyzer.model,
        [p.tensor for p in analyzer._params],
        analyzer.writer,
        analyzer._hooks,
        step,
        inv_scale=inv_scale,
        backward_scale=backward_scale,
        tensorboard=analyzer.tensorboard,
    )


__all__ = ["MICRO_NOISE_STATS", "MicroBatchNoiseScale", "micro_noise_source"]
