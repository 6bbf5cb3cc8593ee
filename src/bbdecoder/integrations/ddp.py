"""The training monitor under ``torch.distributed`` (DistributedDataParallel, ``torchrun``).

After ``backward`` DDP has averaged the gradients on every rank, so the gradient statistics are
the same everywhere; what differs per rank is the loss and what each rank's forward passes saw
(activation statistics). :class:`RankSync` makes the :class:`~bbdecoder.monitor.Analyzer`

- open the run store on one rank only (``writer_rank``, default 0); the other ranks get a
  :class:`NullWriter` and write nothing,
- reduce each step's stacked statistics vector with **one** ``all_reduce`` (the mean over ranks:
  the gradient statistics are unchanged, the loss becomes the mean of the ranks' losses, and a
  NaN on any rank stays NaN),
- merge the activation state once per epoch by the reductions each probe declares (``STATE``,
  :mod:`bbdecoder.monitor.probe_state`): MAX of the per-channel maxima, SUM of the counts, so dead
  units are units dead on every rank and saturated fractions count every sample; any other probe
  with declared state merges the same way (:meth:`RankSync.reduce_probes`).

Every rank must call the recording methods (``backward_propagation``/``step`` every iteration,
``end_epoch``/``close``): they are collective. Draw figures on the writer rank only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bbdecoder.layers import LayerSelection
from bbdecoder.monitor.activations import ActivationProbe
from bbdecoder.monitor.analyzer import Analyzer
from bbdecoder.monitor.coverage import unwrap_model
from bbdecoder.monitor.probe_state import StatefulProbe, merge_states
from bbdecoder.store.writer import RunWriter


class NullWriter:
    """The :class:`~bbdecoder.store.RunWriter` interface on a rank that does not write: every row is
    dropped, identifiers are handed out consistently, no file is created."""

    def __init__(self, save_path: str | Path) -> None:
        self.path = Path(save_path)
        self._series: dict[tuple[int, str], int] = {}
        self._stats: dict[str, int] = {}
        self._blobs = 0
        self.closed = False

    def next_step(self) -> int:
        return 0

    def last_epoch(self) -> int | None:
        return None

    def has_histograms(self) -> bool:
        return False

    def series_id(self, layer_id: int, param: str) -> int:
        return self._series.setdefault((layer_id, param), len(self._series) + 1)

    def stat_id(self, name: str) -> int:
        return self._stats.setdefault(name, len(self._stats) + 1)

    def add_blob(self, *args: Any, **kwargs: Any) -> int:
        self._blobs += 1
        return self._blobs

    def add_array(self, *args: Any, **kwargs: Any) -> int:
        return self.add_blob()

    def _drop(self, *args: Any, **kwargs: Any) -> None:
        return None

    set_layers = set_meta = set_artifact = add_step = add_scalars = add_step_scalars = add_epoch_scalars = (
        _drop
    )
    add_histogram = add_event = flush = relabel_epoch = _drop

    @property
    def pending(self) -> int:
        return 0

    def checkpoint(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class RankSync:
    """Reductions across the ranks of a process group, for ``Analyzer(..., sync=RankSync())``.

    Args:
        process_group: the group to reduce over (``None``: the default group, which must be
            initialised with ``torch.distributed.init_process_group`` first).
        writer_rank: the rank (within the group) that opens the run store.
    """

    def __init__(self, process_group: Any = None, writer_rank: int = 0) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "RankSync needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(...) first (or use the plain Analyzer)"
            )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if not 0 <= writer_rank < self.world_size:
            raise ValueError(f"writer_rank must be in 0..{self.world_size - 1}, got {writer_rank}")
        self.writer_rank = writer_rank
        self._nccl = dist.get_backend(process_group) == "nccl"

    @property
    def is_writer(self) -> bool:
        """True on the one rank that writes the run store."""
        return self.rank == self.writer_rank

    def open_writer(self, save_path: str | Path) -> RunWriter | NullWriter:
        """A :class:`RunWriter` on the writer rank, a :class:`NullWriter` elsewhere."""
        return RunWriter(save_path) if self.is_writer else NullWriter(save_path)

    def _on_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        # NCCL reduces CUDA tensors only; gloo always takes CPU tensors.
        return tensor if self._nccl else tensor.cpu()

    def reduce_step(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of one step's statistics vector (1-D), with one ``all_reduce``.

        Every rank must pass a vector of the same length (the same layers with gradients)."""
        if self.world_size == 1:
            return values
        reduced = self._on_backend(values.double()).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
        return reduced / self.world_size

    def reduce_probes(self, probes: Iterable[StatefulProbe]) -> None:
        """Merge the declared state (``STATE``, see :mod:`bbdecoder.monitor.probe_state`) of every
        probe across ranks, in place: one ``all_reduce`` per reduction kind, one ``all_gather`` per
        ``cat`` tensor. Every rank must pass the same probes in the same order."""
        if self.world_size == 1:
            return
        merge_states(list(probes), self._all_reduce, self._all_gather, self.world_size)

    def reduce_activations(self, probes: dict[int, ActivationProbe]) -> None:
        """Merge the activation probes' epoch state across ranks (by their declared reductions:
        per-channel maxima MAX, so a unit is dead only when it is dead on every rank; counts and
        sums SUM)."""
        self.reduce_probes(probe for _, probe in sorted(probes.items()))

    def _all_reduce(self, flat: torch.Tensor, op: str) -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        out = self._on_backend(flat).clone()
        dist.all_reduce(out, op=ops[op], group=self.group)
        return out

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, tensor.cpu(), group=self.group)
        return list(parts)


class DistributedAnalyzer(Analyzer):
    """An :class:`~bbdecoder.monitor.Analyzer` for a model trained with ``torch.distributed``.

    ``model`` may be the ``DistributedDataParallel`` wrapper or the plain model: layers and
    parameters are named as in the unwrapped model, and :meth:`forward_propagation` runs the
    wrapper (DDP needs its own forward to synchronise gradients). Only ``writer_rank`` writes the
    store in ``save_path`` (give every rank the same path). Recording calls are collective: every
    rank must make them. A model sharded with FSDP2's ``fully_shard`` gets a
    :class:`~bbdecoder.integrations.sharded.ShardSync`: the statistics of the unsharded tensors; an
    FSDP1 (``FullyShardedDataParallel``) model is refused with ``TypeError``.
    ``noise_scale=True`` (DDP wrapper only) stores the two-batch gradient noise scale across ranks
    (:mod:`bbdecoder.integrations.ddp_noise`). ``per_sample=True | k`` (DDP and FSDP2) stores the
    per-sample statistics and noise scale of the global batch, merged exactly across ranks
    (:mod:`bbdecoder.monitor.per_sample_merge`). Other arguments as for :class:`~bbdecoder.monitor.Analyzer`.
    """

    def __init__(
        self,
        model: nn.Module,
        save_path: str | Path = "bbdecoder_run",
        input_size: tuple[int, ...] | None = None,
        *,
        layers: LayerSelection = None,
        process_group: Any = None,
        writer_rank: int = 0,
        noise_scale: bool = False,
        **kwargs: Any,
    ) -> None:
        from bbdecoder.integrations.sharded import rank_sync_for, refuse_fsdp1

        refuse_fsdp1(model)
        sync = rank_sync_for(model, process_group, writer_rank)  # ShardSync for FSDP2 (DTensor) models
        super().__init__(model, save_path, input_size, layers=layers, sync=sync, **kwargs)
        if noise_scale:  # the two-batch gradient noise scale across ranks (see ddp_noise)
            from bbdecoder.integrations.ddp_noise import RankNoiseScale

            self._row_sources.append(
                RankNoiseScale(model, self.writer, self._hooks, process_group, tensorboard=self.tensorboard)
            )

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes the run store."""
        return bool(self.sync.is_writer)


__all__ = ["DistributedAnalyzer", "NullWriter", "RankSync", "unwrap_model"]
