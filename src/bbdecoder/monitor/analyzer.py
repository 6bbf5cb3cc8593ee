"""Analyzer (alias ``Master_analyzer``): watch a model train and record what happens inside.

The analyzer only reads: gradients after backward, weights, and (opt-in) layer outputs through
forward hooks. Training with it attached gives bit-identical weights to training without it.
Everything goes to the run store in ``save_path`` (see :mod:`bbdecoder.store`).
"""

from __future__ import annotations

import json
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerIndex, LayerInfo, LayerSelection
from bbdecoder.monitor.activation_api import ActivationsMixin
from bbdecoder.monitor.activation_watch import ActivationWatcher
from bbdecoder.monitor.activations import ACTIVATION_FUNCTIONS
from bbdecoder.monitor.coverage import ParamOwners, unwrap_model
from bbdecoder.monitor.grad_stats import GRAD_STATS, EpochAccumulator, GradStatistics, UpdateRatios
from bbdecoder.monitor.graph import FunctionGraph, activation_curves, trace_graph
from bbdecoder.monitor.host_copy import HostCopy
from bbdecoder.monitor.inspection import InspectionMixin
from bbdecoder.monitor.per_sample_recorder import per_sample_recorder
from bbdecoder.monitor.run_folder import PARAMETERS_ARTIFACT, check_run_folder, parameter_signature
from bbdecoder.monitor.seed import SeedInterface
from bbdecoder.monitor.settings import check_settings
from bbdecoder.monitor.user_scalars import (
    OPTIMIZER_PARAM,
    USER_LAYER_ID,
    USER_PARAM,
    check_epoch,
    learning_rates,
    scalar_value,
)
from bbdecoder.monitor.weights import QUANTILES, fixed_range, histogram, weight_stat_names, weight_statistics
from bbdecoder.store.background import ThreadedRunWriter
from bbdecoder.store.writer import RunWriter


class NonFiniteGradientWarning(RuntimeWarning):
    """A gradient held NaN or Inf; the message names the first layer in backward order."""


class EmptyEpochError(ValueError):
    """An epoch was closed without any recorded step."""


@dataclass
class _Param:
    row: int
    layer_id: int
    layer: str  # the owner's display name
    name: str  # qualified state_dict name
    tensor: torch.Tensor
    series_id: int


@dataclass
class _StepMeta:
    step: int
    epoch: int
    rows: list[int]
    ratio_label: tuple[int, int] | None
    ratio_n: int
    has_loss: bool
    grad_order: list[int]


def _release(hooks: HookManager, writer: Any, tensorboard: Any) -> None:
    """Detach from the model and close the store (also run by the finalizer of a dropped Analyzer)."""
    try:
        hooks.remove_all()
        if tensorboard is not None:
            tensorboard.close()
    finally:
        if not writer.closed:
            writer.close()


class Analyzer(SeedInterface, ActivationsMixin, InspectionMixin):
    """Record gradient, weight and activation statistics of ``model`` while it trains.

    Args:
        model: the model; it is never modified (except by an explicit :meth:`prune_dead`). A
            ``torch.compile``, ``DistributedDataParallel`` or ``DataParallel`` wrapper is seen
            through: names are the unwrapped model's ``state_dict`` names, and
            :meth:`forward_propagation` calls the wrapper.
        save_path: folder of the run store (created). A store that already holds steps is refused
            unless ``resume=True``.
        input_size: e.g. ``(1, 3, 32, 32)``; when given, :meth:`summary` shows output shapes.
        layers: whose parameters are tracked (IDs, names, globs, types, also the name or ID of a
            module with children that owns parameters; ``None``: every trainable parameter, see
            :mod:`bbdecoder.monitor.coverage`).
        weights: record update ratios every step and weight histograms/quantiles every epoch.
        activations: layers whose outputs are watched (``None``/``False``: none; ``True``: every
            activation-function module; a selection: those layers, see :meth:`watch_activations`).
        dead_threshold: a unit is dead when its activation is <= this for every sample seen.
        saturation_eps: the margin of the saturation bounds (sigmoid, tanh).
        channel_dim: the unit dimension of watched outputs (``None``: per layer kind, 1 for conv /
            norm / pool outputs ``(N, C, ...)``, the last dim otherwise, e.g. ``(N, L, D)``).
        histogram_bins: number of fixed bins of the weight histograms.
        quantiles: weight quantiles recorded per epoch (numbers in [0, 1]).
        scaler: a ``torch.amp.GradScaler``; statistics are then of the unscaled gradients.
        flush_every: write to the store every this many recorded steps (1: a crash loses at most
            the last step).
        every: record statistics every this many steps (1: every step). Steps in between are
            counted (step numbers stay those of the optimizer steps) but not stored.
        sync: a rank synchroniser for ``torch.distributed`` runs (see
            :class:`bbdecoder.integrations.ddp.RankSync`): it opens the store on one rank only and
            reduces each step's statistics and each epoch's activation state across ranks.
        tensorboard: also log live to TensorBoard: ``True`` (``<save_path>/tensorboard``), a log
            folder, or a :class:`~bbdecoder.monitor.tensorboard.TensorBoardLogger` (needs ``tensorboard``).
        per_sample: per-sample gradient statistics and the gradient noise scale every step (``True``)
            or every ``k`` steps (``k``); under ``sync`` over the global batch of all ranks; see
            :mod:`bbdecoder.monitor.per_sample_recorder`.
        micro_noise_scale: the two-batch gradient noise scale from the micro-batches of accumulated
            steps (single process; see :mod:`bbdecoder.monitor.noise_micro`).
        alerts: the alert rules of :mod:`bbdecoder.alerts` evaluated as steps are recorded, stored as
            events and raised once per kind as an ``AlertWarning``: ``True`` (default thresholds), an
            :class:`~bbdecoder.alerts.AlertConfig`, or ``False``; the engine is :attr:`alerts`.
        resume: append to the store in ``save_path`` (steps and epochs continue after its last ones);
            refused with the reason when it holds another model (other parameter names or shapes).
            Without it a store that holds steps is refused (see :mod:`bbdecoder.monitor.run_folder`).

    Every argument is checked before anything is registered; a constructor that fails leaves no
    hook and no open store behind, and an Analyzer that is dropped without :meth:`close` detaches
    itself when it is garbage-collected (its hooks hold only a weak reference to it).
    """

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
        if tensorboard is not None and not isinstance(tensorboard, (bool, str, Path)):
            from bbdecoder.monitor.tensorboard import TensorBoardLogger

            if not isinstance(tensorboard, TensorBoardLogger):
                raise TypeError(
                    "tensorboard= takes True, a log folder or a TensorBoardLogger, got "
                    f"{type(tensorboard).__name__}"
                )
        _check_alerts(alerts)
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
        self._output_shapes = self._probe_shapes(self.input_size) if self.input_size is not None else {}
        self.sync = sync
        self.resume = bool(resume)
        self._hooks = HookManager()
        self.tensorboard: Any = None
        # the store is opened before any hook is registered, and closed again if anything fails
        self.writer = ThreadedRunWriter(self.save_path) if sync is None else sync.open_writer(self.save_path)
        self.alerts = _alert_engine(alerts, self.writer)
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

    def _activation_layers(self, activations: LayerSelection | bool) -> tuple[list[LayerInfo], bool]:
        if activations is None or activations is False:
            return [], False
        if activations is True:
            found = [L for L in self.index if isinstance(L.module, ACTIVATION_FUNCTIONS)]
            if not found:
                warnings.warn(
                    "activations=True found no activation-function module (functional calls such as "
                    "F.relu are not modules); name the layers to watch, e.g. activations=['conv1']",
                    stacklevel=3,
                )
            return found, False
        if isinstance(activations, Sequence) and not isinstance(activations, str) and len(activations) == 0:
            raise ValueError("activations=[] watches nothing; pass None, True or some layers")
        return self.index.select(activations), True

    def _set_up(
        self,
        watch: tuple[list[LayerInfo], bool],
        threshold: float,
        eps: float,
        dim: int | None,
        tensorboard: Any,
        per_sample: bool | int,
    ) -> None:
        owner_rows = [
            (
                o.id,
                o.name,
                o.type_name,
                o.num_params,
                str(self._output_shapes[o.id]) if o.id in self._output_shapes else None,
            )
            for o in self.owners
        ]
        check_run_folder(self.writer, self.model, owner_rows, self.resume)
        self.writer.set_layers(owner_rows)
        self.writer.set_meta("model", type(self.model).__name__)
        self.writer.set_artifact(PARAMETERS_ARTIFACT, "json", json.dumps(parameter_signature(self.model)))
        self._step = self.writer.next_step()
        self._first_step = self._step
        last = self.writer.last_epoch()
        self._epoch = 0 if last is None else last + 1
        self._epoch_first_step: int | None = None
        self._params = self._collect_params()
        self.coverage = self.owners.coverage(
            [p for p in self.owners.params() if p.owner.id in self._by_owner_ids()]
        )
        self.writer.set_meta("coverage", json.dumps(self.coverage.__dict__))
        self._by_layer: dict[int, list[_Param]] = {}
        for p in self._params:
            self._by_layer.setdefault(p.layer_id, []).append(p)
        self._stat_ids = [self.writer.stat_id(s) for s in GRAD_STATS]
        self._ratio_stat = self.writer.stat_id("update_ratio")
        self._acc = EpochAccumulator(len(self._params), len(GRAD_STATS))
        self._grad_stats = GradStatistics()
        sharded_ratios = getattr(self.sync, "update_ratios", None)
        self._ratios: Any = UpdateRatios() if sharded_ratios is None else _SyncRatios(sharded_ratios)
        self._grad_order: list[int] = []
        self._accumulated = 0
        self._calls = 0
        self._recorded = 0
        ref = weakref.ref(self)
        for p in self._params:
            self._hooks.add(p.tensor.register_post_accumulate_grad_hook(_order_hook(ref, p.row)))
        self._ratio_label: tuple[int, int] | None = None
        self._hist_ranges: dict[int, tuple[float, float]] = {}
        self._last_grad_fn: Any = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._activations = ActivationWatcher(self.index, self.writer, self._hooks)
        self._pruned: list[tuple[nn.Module, str]] = []
        device = self._params[0].tensor.device if self._params else torch.device("cpu")
        self._host = HostCopy(deferred=device.type == "cuda")
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

    # -- set-up -------------------------------------------------------------------------------
    def _collect_params(self) -> list[_Param]:
        wanted = self._by_owner_ids()
        params: list[_Param] = []
        for tracked in self.owners.params():
            if tracked.owner.id not in wanted:
                continue
            sid = self.writer.series_id(tracked.owner.id, tracked.name)
            owner = tracked.owner
            params.append(
                _Param(len(params), owner.id, owner.display_name, tracked.name, tracked.tensor, sid)
            )
        return params

    def _probe_shapes(self, input_size: tuple[int, ...]) -> dict[int, list[int]]:
        shapes: dict[int, list[int]] = {}
        ref = next(self.model.parameters(), None)
        x = torch.zeros(input_size, device=ref.device if ref is not None else None)

        def make(layer: LayerInfo) -> Callable[..., None]:
            def hook(_m: nn.Module, _i: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and layer.id not in shapes:
                    shapes[layer.id] = list(out.shape)

            return hook

        with HookManager() as hooks, preserved_state(self.model, eval_mode=True), torch.no_grad():
            for layer in self.index:
                hooks.forward_hook(layer.module, make(layer))
            try:
                self.model(x)
            except Exception as err:
                raise ValueError(
                    f"a forward pass on zeros of input_size={tuple(input_size)} failed ({err}); pass the "
                    "size of one input batch, e.g. (1, 3, 32, 32), or input_size=None"
                ) from err
        return shapes

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Analyzer is closed; create a new one to record more")

    # -- the seed's interface -----------------------------------------------------------------
    # -- plain training loops -----------------------------------------------------------------
    def step(self, layers: LayerSelection = None, loss: torch.Tensor | float | None = None) -> None:
        """Record this iteration's gradient statistics (call after ``loss.backward()``, before
        ``optimizer.step()``). ``loss`` (optional: a scalar tensor or a number) is stored with the step."""
        self._check_open()
        selected = self._select_params(layers)
        self._record_step(selected, _loss_tensor(loss))

    def attach(self, optimizer: torch.optim.Optimizer) -> Analyzer:
        """Record automatically just before each ``optimizer.step()`` (hook removed by :meth:`close`)."""
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

    def log(self, *, epoch: int | bool | None = None, step: int | None = None, **scalars: Any) -> None:
        """Store your own values in the run: ``log(val_acc=0.91)``, ``log(loss=loss)``, ``log(epoch=3, ...)``.

        Each value is a number or a one-element tensor. Per step (default) the values are labelled with
        the optimizer step just counted (call after ``optimizer.step()``; ``step=`` to choose another)
        and read back with ``open_run(path).scalars()`` as rows ``layer_id=-1, param="user",
        stat=<name>``; ``loss=`` is also the step's loss in ``steps()`` (the report's loss curve).
        With ``epoch=`` (a number, or ``True`` for the epoch the values are about: the one that just
        ended when no step was recorded since) they are per-epoch rows of ``epoch_scalars()`` with
        ``agg="value"``. The learning rates of attached optimizers are recorded without a call. See
        :mod:`bbdecoder.monitor.user_scalars`.
        """
        self._check_open()
        if not scalars:
            raise TypeError("log() needs at least one value, e.g. analyzer.log(val_acc=0.9)")
        epoch = check_epoch(epoch)
        values = [(name, scalar_value(name, value)) for name, value in scalars.items()]
        series = self.writer.series_id(USER_LAYER_ID, USER_PARAM)
        if epoch is not None:
            if step is not None:
                raise TypeError("log() takes step= or epoch=, not both")
            if epoch is True:
                ended = self._epoch_first_step is None and self._step > self._first_step and self._epoch > 0
                epoch = self._epoch - 1 if ended else self._epoch
            self.writer.add_epoch_scalars(
                [(int(epoch), series, self.writer.stat_id(name), "value", v) for name, v in values]
            )
        else:
            if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
                raise TypeError(f"log(step=...) takes a step number >= 0, got {step!r}")
            at = (
                step
                if step is not None
                else (self._step - 1 if self._step > self._first_step else self._step)
            )
            self.writer.add_scalars(
                [(at, self._epoch, series, self.writer.stat_id(name), v) for name, v in values]
            )
            if "loss" in scalars:
                set_loss = getattr(self.writer, "set_loss", None)  # the non-writing ranks' writer has none
                if set_loss is not None:
                    set_loss(at, dict(values)["loss"])
        # written with the next step's flush (and by close); an epoch's values at once
        if epoch is not None:
            self.writer.flush()

    def _log_learning_rates(self) -> None:
        rates = learning_rates(self._optimizers)
        if rates:
            series = self.writer.series_id(USER_LAYER_ID, OPTIMIZER_PARAM)
            step = self._step - 1
            self.writer.add_scalars(
                [(step, self._epoch, series, self.writer.stat_id(n), v) for n, v in rates]
            )

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
        mean, var, count = self._acc.result()
        rows = []
        for p in self._params:
            for j, sid in enumerate(self._stat_ids):
                if count[p.row, j] > 0:
                    rows.append((epoch, p.series_id, sid, "mean", float(mean[p.row, j])))
                    rows.append((epoch, p.series_id, sid, "var", float(var[p.row, j])))
        self.writer.add_epoch_scalars(rows)
        if self.track_weights:
            self._record_weights(self._params, last, epoch)
        if self.sync is not None:
            self.sync.reduce_activations(self._activations.probes)
        self._activations.record(last, epoch)
        self.writer.flush()
        _checkpoint(self.writer)
        self._acc = EpochAccumulator(len(self._params), len(GRAD_STATS))
        self._epoch_first_step = None
        self._epoch = epoch + 1
        return epoch

    # -- recording ----------------------------------------------------------------------------
    def _select_params(self, selection: LayerSelection) -> list[_Param]:
        if selection is None:
            return self._params
        owners = self.owners.select(selection)
        missing = [o for o in owners if o.id not in self._by_layer and o.num_params > 0]
        tracked = self._by_owner_ids()
        if [o for o in missing if o.id not in tracked]:
            raise KeyError(
                f"layers {[o.display_name for o in missing]} are not tracked by this Analyzer; add them to "
                "Analyzer(..., layers=...)"
            )
        return [p for o in owners for p in self._by_layer.get(o.id, [])]

    def _inv_scale(self) -> float:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        states = getattr(scaler, "_per_optimizer_states", {})
        if any(int(getattr(s.get("stage"), "value", 0)) == 1 for s in states.values()):  # OptState.UNSCALED
            return 1.0
        return 1.0 / float(scaler.get_scale())

    def _record_step(self, selected: list[_Param], loss: torch.Tensor | None) -> None:
        if self._accumulated == 0:
            raise RuntimeError(
                "no gradient was computed since the last recorded step: call loss.backward() (or "
                "backward_propagation) before step(), once per iteration"
            )
        with_grad = [p for p in selected if p.tensor.grad is not None]
        if not with_grad:
            raise RuntimeError("none of the selected layers has a gradient; did the loss depend on them?")
        record = self._calls % self.every == 0
        self._calls += 1
        step, epoch = self._step, self._epoch
        ratio_label, ratio_n, parts = self._ratio_label, 0, []
        if self.track_weights and (record or ratio_label is not None):
            current = [p.tensor.detach() for p in self._params]
            if ratio_label is not None and self._ratios.ready:
                parts.append(self._ratios.measure(current, keep=record))
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
        grad_stats_fn = getattr(self.sync, "grad_statistics", self._grad_stats)  # sharded: ShardSync's
        stats = grad_stats_fn([p.tensor.grad for p in with_grad], self._inv_scale())  # type: ignore[misc]
        extra = [row for source in self._row_sources for row in source.rows(step, epoch)]
        if extra:
            self.writer.add_scalars(extra)
        parts.insert(0, stats.reshape(-1))
        if loss is not None:
            parts.append(loss.reshape(1).double().to(stats.device))
        meta = _StepMeta(
            step,
            epoch,
            [p.row for p in with_grad],
            ratio_label,
            ratio_n,
            loss is not None,
            list(self._grad_order),
        )
        if self._epoch_first_step is None:
            self._epoch_first_step = step
        if self._activations.probes and not self._activations.checked:
            self._activations.warn_unseen()
        self._finish_step()
        self._submit(torch.cat(parts), meta, step=True)

    def _finish_step(self) -> None:
        self._grad_order.clear()
        self._accumulated = 0
        self._step += 1

    def _submit(self, vector: torch.Tensor, meta: _StepMeta, *, step: bool) -> None:
        if self.sync is not None:
            vector = self.sync.reduce_step(vector)
        for host, ready in self._host.submit(vector, meta):
            self._process(host, ready)
        if step:
            self._recorded += 1
            if self._recorded % self.flush_every == 0 and not self._host.in_flight:
                self.writer.flush()

    def _drain(self) -> None:
        for host, meta in self._host.drain():
            self._process(host, meta)

    def _process(self, host: np.ndarray, meta: _StepMeta) -> None:
        """Turn one step's host vector into store rows, epoch accumulators and events."""
        n = len(meta.rows)
        params = [self._params[r] for r in meta.rows]
        values = host[: n * len(GRAD_STATS)].reshape(n, len(GRAD_STATS))
        rows = [
            (meta.step, meta.epoch, p.series_id, sid, float(v))
            for p, vals in zip(params, values, strict=True)
            for sid, v in zip(self._stat_ids, vals, strict=True)
        ]
        if meta.ratio_n and meta.ratio_label is not None:
            ratio_vals = host[n * len(GRAD_STATS) : n * len(GRAD_STATS) + meta.ratio_n]
            label_step, label_epoch = meta.ratio_label
            rows += [
                (label_step, label_epoch, p.series_id, self._ratio_stat, float(v))
                for p, v in zip(self._params, ratio_vals, strict=True)
            ]
        self.writer.add_scalars(rows)
        if not n:
            return
        loss = float(host[-1]) if meta.has_loss else None
        self.writer.add_step(meta.step, meta.epoch, loss)
        if self.tensorboard is not None:
            self.tensorboard.record_step(
                meta.step, [p.name for p in params], values, loss, {p.name: p.tensor for p in self._params}
            )
        self._acc.update(np.array(meta.rows), values)
        bad = ~np.isfinite(
            values[:, GRAD_STATS.index("max_abs")]
        )  # a gradient is non-finite iff its max |g| is
        if bad.any():
            self._report_nonfinite([p for p, b in zip(params, bad, strict=True) if b], meta)
        if self._host.deferred and self._recorded % self.flush_every == 0:
            self.writer.flush()

    def _report_nonfinite(self, bad: list[_Param], meta: _StepMeta) -> None:
        bad_rows = {p.row for p in bad}
        ordered = [r for r in dict.fromkeys(meta.grad_order) if r in bad_rows]
        first_row = ordered[0] if ordered else max(bad_rows)  # no order recorded: last declared first
        first = self._params[first_row]
        message = (
            f"non-finite gradient at step {meta.step}: first in backward order is layer "
            f"[{first.layer_id}] {first.layer} ({first.name}); {len(bad)} parameter tensor(s) affected"
        )
        self.writer.add_event(
            "nonfinite_grad",
            message,
            step=meta.step,
            epoch=meta.epoch,
            layer_id=first.layer_id,
            param=first.name,
            data={"affected": [p.name for p in bad]},
        )
        if self.scaler is None:  # with a GradScaler, overflow steps are expected and skipped
            warnings.warn(message, NonFiniteGradientWarning, stacklevel=5)

    def _flush_ratio(self) -> None:
        """Measure the update made after the last recorded step (its ``optimizer.step()``)."""
        if not self._ratios.ready or self._ratio_label is None:
            return
        ratios = self._ratios.measure([p.tensor.detach() for p in self._params], keep=True)
        if hasattr(self.sync, "update_ratios"):
            ratios = self.sync.reduce_step(ratios)  # sharded: combine the ranks' partial sums
        ratios = ratios.double().cpu()
        step, epoch = self._ratio_label
        self.writer.add_scalars(
            [
                (step, epoch, p.series_id, self._ratio_stat, float(v))
                for p, v in zip(self._params, ratios, strict=True)
            ]
        )
        self._ratio_label = None

    def _record_weights(self, params: list[_Param], step: int, epoch: int) -> None:
        names = weight_stat_names(self.quantiles)
        stat_ids = [self.writer.stat_id(s) for s in names]
        tensors = getattr(self.sync, "full_tensors", list)([p.tensor for p in params])  # sharded: unsharded
        table = weight_statistics(tensors, self.quantiles)
        rows = []
        for p, tensor, vals in zip(params, tensors, table, strict=True):
            rows += [(step, epoch, p.series_id, sid, float(v)) for sid, v in zip(stat_ids, vals, strict=True)]
            if p.row not in self._hist_ranges:
                self._hist_ranges[p.row] = fixed_range(tensor)
            lo, hi = self._hist_ranges[p.row]
            counts = histogram(tensor, lo, hi, self.histogram_bins)
            self.writer.add_histogram(step, epoch, p.series_id, "weight", lo, hi, counts)
        self.writer.add_scalars(rows)

    # -- activations --------------------------------------------------------------------------
    # -- graph and summary --------------------------------------------------------------------
    def function_graph(self, inputs: Any, save_folder: str | Path | None = None) -> FunctionGraph:
        """Trace the executed operations on ``inputs`` (model restored, nothing recorded), store the
        graph as the ``graph.txt`` and ``graph.dot`` artifacts and, with ``save_folder``, save
        ``function_graph.png`` and ``activation_curves.png`` there."""
        self._check_open()
        with self.paused():
            graph = trace_graph(self.model, inputs)
        self.writer.set_artifact("graph.txt", "text", graph.to_text())
        self.writer.set_artifact("graph.dot", "dot", graph.to_dot())
        if save_folder is not None:
            from bbdecoder.viz.monitor_plots import plot_activation_curves

            graph.draw(Path(save_folder) / "function_graph.png")
            plot_activation_curves(activation_curves(self.model, graph=graph), Path(save_folder))
        return graph

    def summary(self, print_table: bool = True, *, cost: bool = False) -> str:
        """The layer table (ID, qualified name, type, parameters, output shape when ``input_size``
        was given), then the modules with children that own parameters (IDs after the leaves, see
        :mod:`bbdecoder.monitor.coverage`) and a line saying how many parameter tensors and
        elements are tracked out of how many; printed and returned. ``cost=True`` adds FLOPs and
        the median forward time per layer (measured on zeros of ``input_size``, see :meth:`layer_costs`)."""
        costs = {c.id: c for c in self.layer_costs()} if cost else {}
        extra = f"  {'MFLOPs':>10} {'ms':>8}" if cost else ""
        lines = [f"{'ID':>4}  {'name':<40} {'type':<18} {'params':>10}{extra}  output shape"]
        for L in self.index:
            shape = str(self._output_shapes.get(L.id, "")) if self._output_shapes else ""
            measured = f"  {costs[L.id].flops / 1e6:>10.3f} {costs[L.id].forward_ms:>8.3f}" if cost else ""
            name = f"{L.id:>4}  {L.display_name:<40} {L.type_name:<18}"
            lines.append(f"{name} {L.num_params:>10}{measured}  {shape}")
        containers = [o for o in self.owners if not o.leaf]
        if containers:
            lines.append("modules with children that own parameters:")
            lines += [
                f"{o.id:>4}  {o.display_name:<40} {o.type_name:<18} {o.num_params:>10}" for o in containers
            ]
        lines.append(self.coverage.describe())
        table = "\n".join(lines)
        if print_table:
            print(table)
        return table

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
                self.writer.flush()
                _checkpoint(self.writer)
        finally:
            self.closed = True
            self._ratios.reset()
            self._finalizer()

    def __enter__(self) -> Analyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SyncRatios:
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
        ratios = self._measure(self._snapshot, current)
        self.ready = keep
        return ratios


def _order_hook(ref: weakref.ReferenceType[Analyzer], row: int) -> Callable[[torch.Tensor], None]:
    """The gradient hook of one tracked parameter; a weak reference, so it keeps nothing alive."""

    def hook(_tensor: torch.Tensor) -> None:
        analyzer = ref()
        if analyzer is not None:
            analyzer._grad_order.append(row)
            analyzer._accumulated += 1

    return hook


def _loss_tensor(loss: Any) -> torch.Tensor | None:
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


def _checkpoint(writer: Any) -> None:
    """Fold the WAL into the store file where the writer can (so a copy of the file alone is complete)."""
    checkpoint = getattr(writer, "checkpoint", None)
    if callable(checkpoint):
        checkpoint()


Master_analyzer = Analyzer
"""The seed's name for :class:`Analyzer`."""


def _check_alerts(alerts: Any) -> None:
    from bbdecoder.alerts import AlertConfig

    if not isinstance(alerts, (bool, AlertConfig)):
        raise TypeError(f"alerts= takes True, False or an AlertConfig, got {type(alerts).__name__}")


def _alert_engine(alerts: Any, writer: Any) -> Any:
    """The alert rules watching ``writer``; None when turned off and on ranks that do not write."""
    from bbdecoder.alerts import AlertEngine

    if alerts is False or not isinstance(writer, RunWriter):
        return None
    return AlertEngine(None if alerts is True else alerts).attach(writer)
