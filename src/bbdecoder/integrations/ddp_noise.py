"""The gradient noise scale across DDP ranks, nearly for free (McCandlish et al. 2018, appendix A.1).

Each rank's local gradient (before DDP averages it) is a small batch of ``b`` samples, DDP's
average a big batch of ``W * b``: :func:`bbdecoder.monitor.noise_scale.from_two_batches` turns
the ranks' mean ``||G_local||^2`` and ``||G_avg||^2`` into unbiased ``tr(Sigma)`` and ``|G|^2``.
The local squared norms are read in a DDP communication hook that then does exactly what DDP
does without one (divide by the world size, ``all_reduce``), so training is unchanged; per step
one extra ``all_reduce`` of two numbers combines them.

Stored per step for the whole model (``layer_id`` -1, ``param`` ``"*"``): ``noise_trace_ranks``,
``noise_grad_sq_ranks``, ``noise_scale_ranks`` and ``noise_scale_ranks_ema``.

Limits: a DDP model takes one communication hook; this one cannot be removed (DDP has no API for
it), so after :meth:`RankNoiseScale.close` it stays as a pass-through identical to DDP's default.
Local batch sizes must be equal on every rank (counted from dim 0 of the first tensor given to
the model's forward in training and grad mode); otherwise the step's estimate is NaN.
"""

# no `from __future__ import annotations`: DDP checks the comm hook's annotations at runtime
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.monitor.noise_scale import NoiseScaleEMA, from_two_batches

RANK_NOISE_STATS: tuple[str, ...] = (
    "noise_trace_ranks",
    "noise_grad_sq_ranks",
    "noise_scale_ranks",
    "noise_scale_ranks_ema",
)


def _noise_comm_hook(state: "RankNoiseScale", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    if state.active:
        state.local_sq += float(torch.linalg.vector_norm(buffer.detach(), dtype=torch.float64)) ** 2
    group = state.group if state.group is not None else dist.group.WORLD
    buffer.div_(state.world_size)  # as DDP's default reduction: divide first, then sum
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


class RankNoiseScale:
    """A row source for the Analyzer: the two-batch noise scale across the ranks of ``ddp``.

    Args:
        ddp: the ``DistributedDataParallel`` model (its communication hook is taken).
        writer: the run writer.
        hooks: where the sample-counting forward pre-hook is registered.
        process_group: the DDP process group (``None``: the default group).
        ema: decay of the smoothed value.
        tensorboard: a :class:`~bbdecoder.monitor.tensorboard.TensorBoardLogger` that gets the rows live.
    """

    def __init__(
        self,
        ddp: nn.Module,
        writer: Any,
        hooks: HookManager,
        process_group: Any = None,
        ema: float = 0.9,
        tensorboard: Any = None,
    ) -> None:
        if not isinstance(ddp, nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"noise_scale=True needs the DistributedDataParallel wrapper, got {type(ddp).__name__}"
            )
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.active = True
        self.local_sq = 0.0
        self.samples = 0
        self._params = [p for p in ddp.module.parameters() if p.requires_grad]
        self._series = writer.series_id(-1, "*")
        self._stats = [writer.stat_id(s) for s in RANK_NOISE_STATS]
        self.ema = NoiseScaleEMA(ema)
        self.tensorboard = tensorboard
        ddp.register_comm_hook(self, _noise_comm_hook)
        hooks.forward_pre_hook(ddp.module, self._count)

    def _count(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
            if first is not None:
                self.samples += int(first.shape[0])

    def rows(self, step: int, epoch: int) -> list[tuple[int, int, int, int, float]]:
        """This step's rows (collective: every rank calls it); resets the local counts."""
        grads = [p.grad for p in self._params if p.grad is not None]
        big_sq = float(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads))
        counts = torch.tensor(
            [self.local_sq, float(self.samples), float(self.samples) ** 2], dtype=torch.float64
        )
        if dist.get_backend(self.group) == "nccl" and grads:
            counts = counts.to(grads[0].device)
        dist.all_reduce(counts, group=self.group)
        self.local_sq, self.samples = 0.0, 0
        small_sq, total, total_sq = (float(v) for v in counts.cpu())
        w = self.world_size
        b_small = total / w
        equal = total > 0 and math.isclose(total_sq / w, b_small * b_small)
        if equal and w > 1:
            estimate = from_two_batches(small_sq / w, b_small, big_sq, total)
            values = [estimate.trace, estimate.grad_sq, estimate.noise_scale, self.ema.update(estimate)]
        else:
            values = [math.nan] * 3 + [self.ema.value]
        if self.tensorboard is not None:
            from bbdecoder.monitor.tensorboard import stat_tag

            self.tensorboard.record_scalars(
                step, {stat_tag(s, "*"): float(v) for s, v in zip(RANK_NOISE_STATS, values, strict=True)}
            )
        return [
            (step, epoch, self._series, sid, float(v)) for sid, v in zip(self._stats, values, strict=True)
        ]

    def close(self) -> None:
        """Stop measuring (the communication hook stays, as a pass-through)."""
        self.active = False


__all__ = ["RANK_NOISE_STATS", "RankNoiseScale"]
