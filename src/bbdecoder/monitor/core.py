"""The PyTorch training monitor without the seed's calls: construction, the step and epoch calls of
plain training loops, and its lifetime. :class:`~bbdecoder.monitor.Analyzer` (in
:mod:`bbdecoder.monitor.seed`) adds the seed's interface on top; see its docstring for the arguments.

Jobs live in mixins: capture (:mod:`~bbdecoder.monitor.capture`), activations
(:mod:`~bbdecoder.monitor.activation_api`), inspection, user values (:mod:`~bbdecoder.monitor.user_scalars`),
summary; what a step or an epoch becomes in the store is the shared
:class:`~bbdecoder.monitor.recorder.Recorder`'s job.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.layers import LayerIndex, LayerInfo, LayerSelection
from bbdecoder.monitor.activation_api import ActivationsMixin
from bbdecoder.monitor.activation_watch import ActivationWatcher
from bbdecoder.monitor.capture import GradientCapture, SyncRatios, _Param, loss_tensor, order_hook
from bbdecoder.monitor.coverage import ParamOwners, unwrap_model
from bbdecoder.monitor.grad_prefetch import GradPrefetch
from bbdecoder.monitor.grad_stats import GradStatistics, UpdateRatios
from bbdecoder.monitor.host_copy import HostCopy
from bbdecoder.monitor.inspection import InspectionMixin
from bbdecoder.monitor.per_sample_recorder import per_sample_recorder
from bbdecoder.monitor.ratio_prefetch import RatioPrefetch
from bbdecoder.monitor.recorder import Recorder, note_progress
from bbdecoder.monitor.run_folder import check_run_folder, parameter_signature
from bbdecoder.monitor.settings import alert_engine, check_alerts, check_settings, check_tensorboard
from bbdecoder.monitor.summary import SummaryMixin, probe_shapes
from bbdecoder.monitor.user_scalars import UserLogMixin
from bbdecoder.monitor.weights import QUANTILES
from bbdecoder.store import vocabulary as V
from bbdecoder.store.background import ThreadedRunWriter

_M = TypeVar("_M", bound="TorchMonitor")


class EmptyEpochError(ValueError):
    """An epoch was closed without any recorded step."""


def _release(hooks: HookManager, writer: Any, tensorboard: Any) -> None:
    """Detach from the model and close the store (also run by the finalizer of a dropped Analyzer)."""
    try:
        hooks.remove_all()
        if tensorboard is not None:
            tensorboard.close()
    finally:
        if not writer.closed:
            writer.close()


class TorchMonitor(GradientCapture, ActivationsMixin, InspectionMixin, UserLogMixin, SummaryMixin):
    """The monitor behind :class:`~bbdecoder.monitor.Analyzer` (arguments documented there)."""

    def __init__(
        self,
        model: nn.Module,
        save_path: str | Path = "bbdecoder_run",
        input_size: tuple[int, ...] | None = None,
        *,
        layers: LayerSelection = None,
        weights: bool = True,
        activations: LayerSelection | bool = False,
        dead_threshold: float = 0.0,
        saturation_eps: float = 1e-3,
        channel_dim: int | None = None,
        histogram_bins: int = 64,
        quantiles: tuple[float, ...] = QUANTILES,
        scaler: Any = None,
        flush_every: int = 1,
        every: int = 1,
        sync: Any = None,
        tensorboard: Any = None,
        per_sample: bool | int = False,
        micro_noise_scale: bool = False,
        alerts: Any = True,
        resume: bool = False,
    ) -> None:
        self.closed = True  # until construction succeeds
        if not isinstance(model, nn.Module):
            raise TypeError(f"Analyzer needs an nn.Module, got {type(model).__name__}")
        self.quantiles = check_settings(
            flush_every, histogram_bins, quantiles, channel_dim, every, saturation_eps, dead_threshold
        )
        check_tensorboard(tensorboard)
        check_alerts(alerts)
        self.wrapped = model
        self.model = unwrap_model(model)
        self.save_path = Path(save_path)
        self.index = LayerIndex(self.model)
        self.owners = ParamOwners(self.model, self.index)
        self._tracked_owners = self.owners.select(layers)  # raises on a bad or empty selection
        watch = self._activation_layers(activations)
        self.track_weights = bool(weights)
        self.histogram_bins = histogram_bins
        self.scaler = scaler
        self.flush_every = flush_every
        self.every = every
        self.input_size = tuple(input_size) if input_size is not None else None
        shapes = probe_shapes(self.model, self.index, self.input_size) if self.input_size is not None else {}
        self._output_shapes = shapes
        self.sync = sync
        self.resume = bool(resume)
        self._hooks = HookManager()
        self.tensorboard: Any = None
        # the store is opened before any hook is registered, and closed again if anything fails
        self.writer = ThreadedRunWriter(self.save_path) if sync is None else sync.open_writer(self.save_path)
        self.alerts = alert_engine(alerts, self.writer)
        try:
            self._set_up(watch, dead_threshold, saturation_eps, channel_dim, tensorboard, per_sample)
            if micro_noise_scale:
                from bbdecoder.monitor.noise_micro import micro_noise_source

                self._row_sources.append(micro_noise_source(self))
        except BaseException:
            _release(self._hooks, self.writer, self.tensorboard)
            raise
        self._finalizer = weakref.finalize(self, _release, self._hooks, self.writer, self.tensorboard)
        self.closed = False

    def _set_up(
        self,
        watch: tuple[list[LayerInfo], bool],
        threshold: float,
        eps: float,
        dim: int | None,
        tensorboard: Any,
        per_sample: bool | int,
    ) -> None:
        shapes = self._output_shapes
        owner_rows = [
            (o.id, o.name, o.type_name, o.num_params, str(shapes[o.id]) if o.id in shapes else None)
            for o in self.owners
        ]
        check_run_folder(self.writer, self.model, owner_rows, self.resume)
        self.writer.set_layers(owner_rows)
        self.writer.set_meta(V.META_MODEL, type(self.model).__name__)
        self.writer.set_meta(V.META_EVERY, str(self.every))
        self.writer.set_artifact(V.PARAMETERS_ARTIFACT, "json", json.dumps(parameter_signature(self.model)))
        self._step = self.writer.next_step()
        self._first_step = self._step
        last = self.writer.last_epoch()
        self._epoch = 0 if last is None else last + 1
        self._epoch_first_step: int | None = None
        self._params = self._collect_params()
        wanted = self._by_owner_ids()
        self.coverage = self.owners.coverage([p for p in self.owners.params() if p.owner.id in wanted])
        self.writer.set_meta(V.META_COVERAGE, json.dumps(self.coverage.__dict__))
        self._by_layer: dict[int, list[_Param]] = {}
        for p in self._params:
            self._by_layer.setdefault(p.layer_id, []).append(p)
        self.recorder = Recorder(
            self.writer,
            self._params,
            histogram_bins=self.histogram_bins,
            quantiles=self.quantiles,
            loss_scaled=self.scaler is not None,  # with a GradScaler, overflow steps are expected
        )
        self._grad_stats = GradStatistics()
        sharded_ratios = getattr(self.sync, "update_ratios", None)
        self._ratios: Any = UpdateRatios() if sharded_ratios is None else SyncRatios(sharded_ratios)
        self._grad_order: list[int] = []
        self._accumulated = 0
        self._recorded = 0
        ref = weakref.ref(self)
        for p in self._params:
            self._hooks.add(p.tensor.register_post_accumulate_grad_hook(order_hook(ref, p.row)))
        self._ratio_label: tuple[int, int] | None = None
        self._last_grad_fn: Any = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._activations = ActivationWatcher(self.index, self.writer, self._hooks)
        self._activations.arm(self.records_current_step)
        self._pruned: list[tuple[nn.Module, str]] = []
        device = self._params[0].tensor.device if self._params else torch.device("cpu")
        self._host = HostCopy(deferred=device.type == "cuda")
        off_thread = self._off_thread_path()
        self._prefetch = RatioPrefetch(self) if off_thread and self.track_weights else None
        self._grad_prefetch = GradPrefetch() if off_thread else None
        from bbdecoder.monitor.tensorboard import tensorboard_logger

        self.tensorboard = tensorboard_logger(tensorboard, self.save_path, self.sync)
        layers, named = watch
        if layers:
            self._activations.watch(layers, threshold, eps, dim, named=named)
            self._activations.check_dims(self._output_shapes)
        # sources of extra per-step rows (per-sample statistics, the ranks' noise scale): .rows(step, epoch)
        self._row_sources: list[Any] = []
        self._per_sample = per_sample_recorder(
            per_sample,
            self.model,
            self._params,
            self.writer,
            self._step,
            hooks=self._hooks,
            pause=self.paused,
            sync=self.sync,
            tensorboard=self.tensorboard,
        )
        if self._per_sample is not None:
            self._row_sources.append(self._per_sample)
        self.writer.flush()

    def _by_owner_ids(self) -> set[int]:
        return {o.id for o in self._tracked_owners}

    def _collect_params(self) -> list[_Param]:
        wanted = self._by_owner_ids()
        params: list[_Param] = []
        for tracked in self.owners.params():
            owner = tracked.owner
            if owner.id in wanted:
                sid = self.writer.series_id(owner.id, tracked.name)
                params.append(
                    _Param(
                        len(params), owner.id, owner.display_name, tracked.name, sid, tensor=tracked.tensor
                    )
                )
        return params

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Analyzer is closed; create a new one to record more")

    # -- plain training loops -----------------------------------------------------------------
    def step(self, layers: LayerSelection = None, loss: torch.Tensor | float | None = None) -> None:
        """Record this iteration's gradient statistics (call after ``loss.backward()``, before
        ``optimizer.step()``). ``loss`` (optional: a scalar tensor or a number) is stored with the step."""
        self._check_open()
        selected = self._select_params(layers)
        self._record_step(selected, loss_tensor(loss))

    def attach(self: _M, optimizer: torch.optim.Optimizer) -> _M:
        """Record automatically just before each ``optimizer.step()`` (hook removed by :meth:`close`);
        returns this analyzer."""
        self._check_open()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizers.append(optimizer)
        ref = weakref.ref(self)

        def hook(*_: Any) -> None:
            analyzer = ref()
            if analyzer is not None and not analyzer.closed:
                recorded = analyzer._recorded
                analyzer.step()
                if analyzer._recorded != recorded:  # a recorded (not skipped) step: its learning rates
                    analyzer._log_learning_rates()

        self._hooks.add(optimizer.register_step_pre_hook(hook))
        return self

    @property
    def has_new_gradients(self) -> bool:
        """True when a backward pass reached a tracked parameter since the last recorded step."""
        return self._accumulated > 0

    def end_epoch(self, ep: int | None = None) -> int:
        """Close the current epoch (numbered ``ep`` when given) and store its aggregates; returns the
        epoch number. Raises :class:`EmptyEpochError` when no step was recorded in it."""
        self._check_open()
        if ep is not None and (not isinstance(ep, (int, np.integer)) or isinstance(ep, bool) or ep < 0):
            raise TypeError(f"the epoch number must be an int >= 0, got {ep!r}")
        if self._epoch_first_step is None:
            raise EmptyEpochError(
                f"epoch {self._epoch if ep is None else ep} has no recorded steps: call "
                "backward_propagation(loss, collect_grads=True) or step() during the epoch first"
            )
        self._drain()
        first, last = self._epoch_first_step, self._step - 1
        if ep is not None and int(ep) != self._epoch:
            ep = int(ep)
            self.writer.relabel_epoch(first, last, ep)
            if self._ratio_label is not None:
                self._ratio_label = (self._ratio_label[0], ep)
            self._epoch = ep
        epoch = self._epoch
        self._flush_ratio()
        self.recorder.end_epoch(epoch)
        if self.track_weights:
            self._record_weights(self._params, last, epoch)
        if self.sync is not None:
            self.sync.reduce_activations(self._activations.probes)
        self._activations.record(last, epoch)
        self._note_progress(epoch)
        self.writer.flush()
        _checkpoint(self.writer)
        self._epoch_first_step = None
        self._epoch = epoch + 1
        return epoch

    # -- lifetime -----------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The number the next recorded step will get."""
        return self._step

    @property
    def current_epoch(self) -> int:
        return self._epoch

    def close(self) -> None:
        """Finish the open epoch (if it has steps), remove every hook, flush and close the store."""
        if self.closed:
            return
        try:
            self._drain()
            if self._epoch_first_step is not None:
                self.end_epoch()
            else:
                self._flush_ratio()
                self._note_progress(None)
                self.writer.flush()
                _checkpoint(self.writer)
        finally:
            self.closed = True
            if self._prefetch is not None:
                self._prefetch.drop()  # _drain() waited for the writer thread (or raised its error)
            if self._grad_prefetch is not None:
                self._grad_prefetch.settle()
            self._ratios.reset()
            self._finalizer()

    def _note_progress(self, ended_epoch: int | None) -> None:
        note_progress(self.writer, self._step if self._step > self._first_step else None, ended_epoch)

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checkpoint(writer: Any) -> None:
    """Fold the WAL into the store file where the writer can (so a copy of the file alone is complete)."""
    checkpoint = getattr(writer, "checkpoint", None)
    if callable(checkpoint):
        checkpoint()
