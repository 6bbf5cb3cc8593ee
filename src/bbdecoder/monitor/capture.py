"""The PyTorch capture of the training monitor (a mixin of the Analyzer): the gradient hooks that
count backward passes and note the backward order, the fused device statistics of each step in one
vector (gradient statistics, update ratios, loss), one host copy per step (deferred on CUDA), and
the hand-over of host arrays to the shared :class:`~bbdecoder.monitor.recorder.Recorder`."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from bbdecoder.layers import LayerSelection
from bbdecoder.monitor.recorder import Recorder, Series
from bbdecoder.store.background import after_held_steps
from bbdecoder.store.vocabulary import GRAD_STATS

_NSTATS = len(GRAD_STATS)


@dataclass
class _Param(Series):
    tensor: torch.Tensor = field(kw_only=True)


@dataclass
class _StepMeta:
    step: int
    epoch: int
    rows: list[int]
    ratio_label: tuple[int, int] | None
    ratio_n: int
    has_loss: bool
    grad_order: list[int]


class GradientCapture:
    """``_record_step`` and what feeds it; the analyzer provides the attributes used here."""

    _params: list[_Param]
    _accumulated: int
    _grad_order: list[int]

    def _select_params(self: Any, selection: LayerSelection) -> list[_Param]:
        if selection is None:
            return list(self._params)
        owners = self.owners.select(selection)
        missing = [o for o in owners if o.id not in self._by_layer and o.num_params > 0]
        tracked = self._by_owner_ids()
        if [o for o in missing if o.id not in tracked]:
            raise KeyError(
                f"layers {[o.display_name for o in missing]} are not tracked by this Analyzer; add them to "
                "Analyzer(..., layers=...)"
            )
        return [p for o in owners for p in self._by_layer.get(o.id, [])]

    def _inv_scale(self: Any) -> float:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        states = getattr(scaler, "_per_optimizer_states", {})
        if any(int(getattr(s.get("stage"), "value", 0)) == 1 for s in states.values()):  # OptState.UNSCALED
            return 1.0
        return 1.0 / float(scaler.get_scale())

    def _record_step(self: Any, selected: list[_Param], loss: torch.Tensor | None) -> None:
        if self._accumulated == 0:
            raise RuntimeError(
                "no gradient was computed since the last recorded step: call loss.backward() (or "
                "backward_propagation) before step(), once per iteration"
            )
        # each attribute of a tensor costs microseconds from the cold caches backward leaves: once
        pairs = [(p, p.tensor.grad) for p in selected]
        with_grad = [p for p, grad in pairs if grad is not None]
        if not with_grad:
            raise RuntimeError("none of the selected layers has a gradient; did the loss depend on them?")
        step, epoch = self._step, self._epoch
        record = self._records(step)
        if self._epoch_first_step is None:  # also a step every= skips: the epoch has run
            self._epoch_first_step = step
        # a CPU model without a sync stays in NumPy to the recorder (fewer, cheaper calls)
        on_host = self.sync is None and not self._host.deferred and with_grad[0].tensor.is_cpu
        stats: Any = None
        if record:  # the gradients before the weights: the backward pass wrote them last
            grads = [grad for _, grad in pairs if grad is not None]
            if on_host:
                prefetch = self._grad_prefetch
                known = None if prefetch is None else prefetch.take([p.row for p in with_grad], grads)
                stats = self._grad_stats.host(grads, self._inv_scale(), known)
            else:
                grad_stats_fn = getattr(self.sync, "grad_statistics", self._grad_stats)  # FSDP: ShardSync's
                stats = grad_stats_fn(grads, self._inv_scale())
        ratio_label, ratio_n, parts = self._ratio_label, 0, []
        if self.track_weights and (record or ratio_label is not None):
            current = [p.tensor for p in self._params]  # detached where torch ops read them
            if ratio_label is not None and self._ratios.ready:
                taken = self._taken_ratios(current, on_host, keep=record)
                if taken is None:
                    measure = self._ratios.measure_host if on_host else self._ratios.measure
                    taken = measure(current, keep=record)
                parts.append(taken)
                ratio_n = len(self._params)
            elif record:
                self._ratios.remember(current)
            self._ratio_label = (step, epoch) if record else None
        if not record:
            self._finish_step()
            if ratio_n and ratio_label is not None:  # the update of the last recorded step, alone
                self._submit(
                    parts[0], _StepMeta(step, epoch, [], ratio_label, ratio_n, False, []), step=False
                )
            return
        assert stats is not None
        extra = [row for source in self._row_sources for row in source.rows(step, epoch)]
        if extra:  # in order: after the previous steps' jobs (held or running), before this one's
            after_held_steps(self.writer, partial(self.writer.add_scalars, extra))
        parts.insert(0, stats.reshape(-1))
        if loss is not None:
            parts.append(np.array([float(loss)]) if on_host else loss.reshape(1).double().to(stats.device))
        rows = [p.row for p in with_grad]
        meta = _StepMeta(step, epoch, rows, ratio_label, ratio_n, loss is not None, list(self._grad_order))
        if self._activations.probes and not self._activations.checked:
            self._activations.warn_unseen()
        self._finish_step()
        self._submit(np.concatenate(parts) if on_host else torch.cat(parts), meta, step=True)

    def _finish_step(self: Any) -> None:
        self._grad_order.clear()
        self._accumulated = 0
        self._step += 1
        self._activations.arm(self._records(self._step))

    def _records(self: Any, step: int) -> bool:
        """Whether step number ``step`` is one ``every=`` records (step numbers, not calls, so a
        resumed run keeps the same grid)."""
        return step % self.every == 0

    @property
    def records_current_step(self: Any) -> bool:
        """True when the step in progress (:attr:`current_step`) is one ``every=`` records: the
        probes watch its forwards."""
        return self._records(self._step)

    def _submit(self: Any, vector: torch.Tensor | np.ndarray, meta: _StepMeta, *, step: bool) -> None:
        # the bookkeeping goes to the writer thread where it can, overlapping the next forward and
        # backward; a non-finite step stays here, so its warning comes from this call
        later = self._later()
        if isinstance(vector, np.ndarray):  # a CPU step without a sync: already on the host
            if later is not None and np.isfinite(vector).all():
                if step:
                    self._recorded += 1
                # the job holds the recorder, not the analyzer: a dropped analyzer is collected at once
                job = partial(_record_vector, self.recorder, vector, meta)
                later(job, flush=step and self._recorded % self.flush_every == 0)
                return
            ready = [(vector, meta)]
        else:
            if self.sync is not None:
                vector = self.sync.reduce_step(vector)
            ready = self._host.submit(vector, meta)
        for host, ready_meta in ready:
            if self._host.deferred and later is not None and np.isfinite(host).all():
                # the previous step's vector (CUDA): its bookkeeping off the training thread, where
                # every microsecond of Python delays the next kernel launches
                job = partial(_record_vector, self.recorder, host, ready_meta)
                later(job, flush=bool(ready_meta.rows) and self._recorded % self.flush_every == 0)
                continue
            self._wait_for_writer()  # the previous step's bookkeeping first
            self._process(host, ready_meta)
        if step:
            self._recorded += 1
            if self._recorded % self.flush_every == 0 and not self._host.in_flight:
                self.writer.flush()

    def _later(self: Any) -> Callable[..., None] | None:
        """The threaded writer's ``run_then_flush``, where the bookkeeping may leave this thread."""
        return getattr(self.writer, "run_then_flush", None) if self.tensorboard is None else None

    def _drain(self: Any) -> None:
        """Every recorded step in the recorder: the writer thread's jobs, the deferred host copy."""
        self._wait_for_writer()
        for host, meta in self._host.drain():
            self._process(host, meta)

    def _wait_for_writer(self: Any) -> None:
        wait = getattr(self.writer, "wait", None)  # a threaded writer (rank writers have none)
        if wait is not None:
            wait()

    def _process(self: Any, host: np.ndarray, meta: _StepMeta) -> None:
        """Hand one step's host vector to the recorder (and TensorBoard)."""
        values, loss = _record_vector(self.recorder, host, meta)
        if values is None:
            return
        if self.tensorboard is not None:
            params = [self._params[r] for r in meta.rows]
            tensors = {p.name: p.tensor for p in self._params}
            self.tensorboard.record_step(meta.step, [p.name for p in params], values, loss, tensors)
        if self._host.deferred and self._recorded % self.flush_every == 0:
            self.writer.flush()

    def _off_thread_path(self: Any) -> bool:
        """Whether work can be handed to the writer thread outside ``step()`` (the update ratios of
        :mod:`~bbdecoder.monitor.ratio_prefetch`, the gradient reads of
        :mod:`~bbdecoder.monitor.grad_prefetch`): CPU tensors, this process's own threaded store."""
        return (
            self.sync is None
            and not self._host.deferred
            and hasattr(self.writer, "run_soon")
            and bool(self._params)
            and all(p.tensor.device.type == "cpu" for p in self._params)
        )

    def _taken_ratios(self: Any, current: list[torch.Tensor], on_host: bool, keep: bool) -> np.ndarray | None:
        """The ratios measured on the writer thread after ``optimizer.step()``
        (:mod:`~bbdecoder.monitor.ratio_prefetch`), or ``None``: measure them here."""
        prefetch = self._prefetch
        if prefetch is None:
            return None
        if not on_host:
            prefetch.settle(self)
            return None
        return prefetch.take(self, current, keep)

    def _flush_ratio(self: Any) -> None:
        """Measure the update made after the last recorded step (its ``optimizer.step()``)."""
        if not self._ratios.ready or self._ratio_label is None:
            return
        current = [p.tensor.detach() for p in self._params]
        taken = self._taken_ratios(current, True, keep=True)
        if taken is not None:
            host = taken
        else:
            ratios = self._ratios.measure(current, keep=True)
            if hasattr(self.sync, "update_ratios"):
                ratios = self.sync.reduce_step(ratios)  # sharded: combine the ranks' partial sums
            host = ratios.double().cpu().numpy()
        step, epoch = self._ratio_label
        self.recorder.ratios(step, epoch, range(len(self._params)), host)
        self._ratio_label = None

    def _record_weights(self: Any, params: list[_Param], step: int, epoch: int) -> None:
        tensors = getattr(self.sync, "full_tensors", list)([p.tensor for p in params])  # sharded: unsharded
        self.recorder.weights(step, epoch, [p.row for p in params], tensors)


def _record_vector(
    recorder: Recorder, host: np.ndarray, meta: _StepMeta
) -> tuple[np.ndarray | None, float | None]:
    """Store one step's host vector (statistics, update ratios, loss) through ``recorder``; returns
    the ``(n, 6)`` statistics and the loss (``None, None`` for a vector of ratios alone)."""
    n = len(meta.rows)
    if meta.ratio_n and meta.ratio_label is not None:
        label_step, label_epoch = meta.ratio_label
        ratios = host[n * _NSTATS : n * _NSTATS + meta.ratio_n]
        recorder.ratios(label_step, label_epoch, range(meta.ratio_n), ratios)
    if not n:
        return None, None
    values = host[: n * _NSTATS].reshape(n, _NSTATS)
    loss = float(host[-1]) if meta.has_loss else None
    order = meta.grad_order
    recorder.step(meta.step, meta.epoch, meta.rows, values, loss, first_bad=lambda bad: _first_in(bad, order))
    return values, loss


def _first_in(bad: list[Series], grad_order: list[int]) -> Series:
    """The first of ``bad`` in backward order (no order recorded: the last declared one)."""
    rows = {s.row: s for s in bad}
    ordered = [r for r in dict.fromkeys(grad_order) if r in rows]
    return rows[ordered[0] if ordered else max(rows)]


class SyncRatios:
    """:class:`UpdateRatios`' interface over a sync that measures the ratios itself (FSDP2's
    ``ShardSync.update_ratios(snapshot, current)``, which also refreshes the snapshot)."""

    def __init__(self, measure: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]) -> None:
        self._measure = measure
        self._snapshot: list[torch.Tensor] | None = None
        self.ready = False

    def reset(self) -> None:
        self._snapshot, self.ready = None, False

    def remember(self, current: list[torch.Tensor]) -> None:
        if self._snapshot is None:
            self._snapshot = [t.detach().clone() for t in current]
        else:
            for s, c in zip(self._snapshot, current, strict=True):
                s.copy_(c)
        self.ready = True

    def measure(self, current: list[torch.Tensor], keep: bool = True) -> torch.Tensor:
        assert self._snapshot is not None
        ratios = self._measure(self._snapshot, [c.detach() for c in current])
        self.ready = keep
        return ratios


def order_hook(ref: weakref.ReferenceType[Any], row: int) -> Callable[[torch.Tensor], None]:
    """The post-accumulate-grad hook of one tracked parameter; a weak reference, so it keeps
    nothing alive."""

    def hook(tensor: torch.Tensor) -> None:
        analyzer = ref()
        if analyzer is not None:
            analyzer._grad_order.append(row)
            analyzer._accumulated += 1
            if analyzer._grad_prefetch is not None:  # hand the gradient to the writer thread
                analyzer._grad_prefetch.written(analyzer, row, tensor)

    return hook


def loss_tensor(loss: Any) -> torch.Tensor | None:
    """``loss`` (a scalar tensor or a number) as a detached tensor, or ``None``."""
    if loss is None:
        return None
    if isinstance(loss, (int, float, np.floating, np.integer)) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=torch.float64)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a scalar tensor or a number, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first (loss.mean())"
        )
    return loss.detach()
