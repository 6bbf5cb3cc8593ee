"""The training monitor on FSDP2 (``torch.distributed.fsdp.fully_shard``) models.

Under FSDP2 each rank holds a shard of every parameter and of its gradient (a ``DTensor``, dim 0
split across the ranks, possibly unevenly or empty). :class:`ShardSync` makes the
:class:`~bbdecoder.monitor.Analyzer` record the statistics of the full, unsharded tensors, exactly:

- per step, each rank reduces its local shards (``DTensor.to_local()``) to partial sums: element
  count, sum, the sum of squared deviations from the shard's own mean, max |g|, sum |g|, sum g^2
  (and, for update ratios, ||W||^2 and ||dW||^2); **one** ``all_gather`` of the step's vector
  (the loss and any other per-rank value riding along, as under DDP) gives every rank all partials,
  combined exactly (the variance with Chan's pairwise formula, no E[g^2] - E[g]^2 cancellation);
- per epoch, weight statistics and histograms are taken on the full tensors
  (``DTensor.full_tensor()``, one parameter at a time).

Statistics are of the gradients as FSDP2 leaves them: after its reduce-scatter, in the sharded
parameters' dtype (with a ``MixedPrecisionPolicy`` whose ``reduce_dtype`` differs, the values are
those of the gradient as stored on the sharded parameter). A ``DTensor`` replicated along some mesh
dimensions (HSDP) is counted once: from the ranks whose coordinate on each replicated dimension is
0. A plain tensor (not managed by FSDP2) is taken from rank 0 only.

Limits: every rank must make the recording calls (they are collective); under FSDP2 draw
:meth:`~bbdecoder.monitor.Analyzer.visualize_weight_hist` only after an epoch was closed (before
that it would gather weights on the writer rank alone).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from bbdecoder.integrations.ddp import RankSync

_PARTIALS = 6  # count, sum, m2, max_abs, l1, sumsq


def is_sharded_model(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2, tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_part(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's share of ``tensor`` for a sum over the full tensor: the local shard of a
    ``DTensor`` (empty where this rank only holds a replica), the whole of a plain tensor on rank 0
    and an empty tensor elsewhere."""
    if isinstance(tensor, DTensor):
        placements = tensor.placements
        if any(isinstance(p, Partial) for p in placements):
            raise ValueError(
                "a gradient DTensor has a Partial placement (not reduced yet); record after backward"
            )
        coordinate = tensor.device_mesh.get_coordinate() or [0] * len(placements)
        local = tensor.to_local()
        if any(isinstance(p, Replicate) and c != 0 for p, c in zip(placements, coordinate, strict=True)):
            return local.reshape(-1)[:0]
        return local
    return tensor if rank == 0 else tensor.reshape(-1)[:0]


def partial_sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``(n, 6)`` float64: count, sum, sum of squared deviations from the local mean, max |x|,
    sum |x|, sum x^2 of each (local) tensor; an empty tensor gives zeros."""
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        n = flat.numel()
        if n == 0:
            rows.append(torch.zeros(_PARTIALS, dtype=torch.float64, device=flat.device))
            continue
        total = flat.sum()
        m2 = (flat - total / n).pow(2).sum()
        magnitude = flat.abs()
        rows.append(
            torch.stack(
                [total.new_tensor(float(n)), total, m2, magnitude.amax(), magnitude.sum(), flat.pow(2).sum()]
            )
        )
    if not rows:
        return torch.zeros(0, _PARTIALS, dtype=torch.float64)
    return torch.stack(rows)


def combine_partials(parts: torch.Tensor) -> torch.Tensor:
    """``(ranks, n, 6)`` partial sums -> ``(n, 6)`` statistics in the order of
    :data:`~bbdecoder.monitor.grad_stats.GRAD_STATS` (mean, mean |g|, max |g|, population
    variance, L1, L2). The variance combines the ranks' deviation sums around the global mean
    (Chan et al.): ``M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2``."""
    count, total, m2, max_abs, l1, sumsq = parts.unbind(-1)
    n = count.sum(0)
    mean = total.sum(0) / n
    local_mean = torch.where(count > 0, total / count.clamp_min(1), mean)
    spread = (m2 + count * (local_mean - mean).pow(2)).sum(0)
    return torch.stack([mean, l1.sum(0) / n, max_abs.amax(0), spread / n, l1.sum(0), sumsq.sum(0).sqrt()], -1)


class ShardSync(RankSync):
    """:class:`~bbdecoder.integrations.ddp.RankSync` for sharded (FSDP2) models: the Analyzer asks
    it for :meth:`grad_statistics`, :meth:`update_ratios` and :meth:`full_tensors`, and
    :meth:`reduce_step` turns the partial sums into the full tensors' statistics with one
    ``all_gather``. Arguments as for ``RankSync``."""

    def __init__(self, process_group: Any = None, writer_rank: int = 0) -> None:
        super().__init__(process_group, writer_rank)
        self._n_stats = 0
        self._ratio_parts: torch.Tensor | None = None

    def grad_statistics(self, grads: list[torch.Tensor], inv_scale: float = 1.0) -> torch.Tensor:
        """The local partial sums ``(n, 6)`` (combined by :meth:`reduce_step`)."""
        parts = partial_sums([local_part(g, self.rank) for g in grads])
        if inv_scale != 1.0:
            s = inv_scale
            parts = parts * parts.new_tensor([1.0, s, s * s, s, s, s * s])
        self._n_stats = len(grads)
        return parts

    def update_ratios(self, snapshot: list[torch.Tensor], current: list[torch.Tensor]) -> torch.Tensor:
        """A placeholder ``(n,)`` whose values :meth:`reduce_step` fills in with
        ``||W_now - W_before|| / ||W_before||`` of the full tensors; ``snapshot`` is then
        overwritten with ``current`` (local shards, in place)."""
        before = [local_part(t, self.rank) for t in snapshot]
        now = [local_part(t, self.rank) for t in current]
        before_sq = torch.stack([b.double().pow(2).sum() for b in before]) if before else torch.zeros(0)
        delta_sq = torch.stack(
            [(b.double() - c.double()).pow(2).sum() for b, c in zip(before, now, strict=True)]
        )
        for s, c in zip(snapshot, current, strict=True):
            _local(s).copy_(_local(c))
        self._ratio_parts = torch.stack([before_sq, delta_sq.to(before_sq.device)], 1)
        return torch.zeros(len(snapshot), dtype=torch.float64, device=before_sq.device)

    def full_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The unsharded tensors (``DTensor.full_tensor()``; a collective per tensor)."""
        return [t.full_tensor().detach() if isinstance(t, DTensor) else t.detach() for t in tensors]

    def reduce_step(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` = [``n * 6`` partials from :meth:`grad_statistics`, ``m`` placeholders from
        :meth:`update_ratios`, per-rank values] -> [``n * 6`` statistics, ``m`` ratios, the mean
        of the per-rank values over ranks], with one ``all_gather``."""
        n6 = self._n_stats * _PARTIALS
        ratio_parts = self._ratio_parts if self._ratio_parts is not None else torch.zeros(0, 2)
        m = len(ratio_parts)
        self._n_stats, self._ratio_parts = 0, None
        payload = torch.cat([values.reshape(-1).double().cpu(), ratio_parts.reshape(-1).double().cpu()])
        payload = self._on_backend(payload.to(values.device))
        if self.world_size == 1:
            rows = payload.unsqueeze(0)
        else:
            gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
            dist.all_gather(gathered, payload.contiguous(), group=self.group)
            rows = torch.stack(gathered)
        length = values.numel()
        stats = combine_partials(rows[:, :n6].reshape(rows.shape[0], -1, _PARTIALS)).reshape(-1)
        parts = rows[:, length:].reshape(rows.shape[0], m, 2).sum(0)
        ratios = parts[:, 1].sqrt() / parts[:, 0].sqrt()
        rest = rows[:, n6 + m : length].mean(0)
        return torch.cat([stats, ratios, rest]).to(values.device)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


FSDP1_MESSAGE = (
    "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel, Lightning's FSDPStrategy) is not supported: "
    "it flattens each wrapped module's parameters into one FlatParameter, so neither the state_dict names "
    "nor per-tensor gradients exist on a rank (and in torch 2.13 it needs an accelerator: it does not run "
    "on CPU). Use FSDP2: torch.distributed.fsdp.fully_shard (in Lightning: "
    "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard applied in "
    "LightningModule.configure_model, mesh=self.device_mesh['data_parallel'])"
)


def refuse_fsdp1(model: nn.Module) -> None:
    """Raise ``TypeError`` (:data:`FSDP1_MESSAGE`) when ``model`` holds an FSDP1 wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(FSDP1_MESSAGE)


def rank_sync_for(model: nn.Module, process_group: Any = None, writer_rank: int = 0) -> RankSync:
    """:class:`ShardSync` for a model with sharded (``DTensor``) parameters, else ``RankSync``."""
    cls = ShardSync if is_sharded_model(model) else RankSync
    return cls(process_group, writer_rank)


__all__ = [
    "FSDP1_MESSAGE",
    "ShardSync",
    "combine_partials",
    "is_sharded_model",
    "local_part",
    "partial_sums",
    "rank_sync_for",
    "refuse_fsdp1",
]
