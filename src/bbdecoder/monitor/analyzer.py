"""Analyzer (alias ``Master_analyzer``): watch a model train and record what happens inside.

The analyzer only reads: gradients after backward, weights, and (opt-in) layer outputs through
forward hooks. Training with it attached gives bit-identical weights to training without it.
Everything goes to the run store in ``save_path`` (see :mod:`bbdecoder.store`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerIndex, LayerInfo, LayerSelection
from bbdecoder.monitor.activation_watch import ActivationWatcher
from bbdecoder.monitor.activations import channel_similarity
from bbdecoder.monitor.grad_stats import GRAD_STATS, EpochAccumulator, grad_statistics, update_ratios
from bbdecoder.monitor.graph import FunctionGraph, activation_curves, trace_graph
from bbdecoder.monitor.inspection import InspectionMixin
from bbdecoder.monitor.per_sample_recorder import per_sample_recorder
from bbdecoder.monitor.pruning import PrunedUnits, PruneReport, make_permanent, mask_channels, output_channels
from bbdecoder.monitor.weights import QUANTILES, fixed_range, histogram, weight_stat_names, weight_statistics
from bbdecoder.store.writer import RunWriter


class NonFiniteGradientWarning(RuntimeWarning):
    """A gradient held NaN or Inf; the message names the first layer in backward order."""


class EmptyEpochError(ValueError):
    """An epoch was closed without any recorded step."""


@dataclass
class _Param:
    row: int
    layer_id: int
    layer: str
    name: str  # qualified state_dict name
    tensor: torch.Tensor
    series_id: int


class Analyzer(InspectionMixin):
    """Record gradient, weight and activation statistics of ``model`` while it trains.

    Args:
        model: the model; it is never modified (except by an explicit :meth:`prune_dead`).
        save_path: folder of the run store (created; an existing store is appended to).
        input_size: e.g. ``(1, 3, 32, 32)``; when given, :meth:`summary` shows output shapes.
        layers: layers whose parameters are tracked (IDs, names, globs, types; ``None``: all).
        weights: record update ratios every step and weight histograms/quantiles every epoch.
        activations: layers whose outputs are watched (``None``/``False``: none, ``True``: every layer;
            see :meth:`watch_activations`).
        dead_threshold, saturation_eps, channel_dim: activation settings.
        histogram_bins: number of fixed bins of the weight histograms.
        scaler: a ``torch.amp.GradScaler``; statistics are then of the unscaled gradients.
        flush_every: write to the store every this many steps (1: a crash loses at most one step).
        sync: a rank synchroniser for ``torch.distributed`` runs (see
            :class:`bbdecoder.integrations.ddp.RankSync`): it opens the store on one rank only and
            reduces each step's statistics and each epoch's activation state across ranks.
        tensorboard: also log live to TensorBoard: ``True`` (``<save_path>/tensorboard``), a log
            folder, or a :class:`~bbdecoder.monitor.tensorboard.TensorBoardLogger` (needs ``tensorboard``).
        per_sample: per-sample gradient statistics and the gradient noise scale every step (``True``)
            or every ``k`` steps (``k``); single process; see :mod:`bbdecoder.monitor.per_sample_recorder`.
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
        channel_dim: int = 1,
        histogram_bins: int = 64,
        quantiles: tuple[float, ...] = QUANTILES,
        scaler: Any = None,
        flush_every: int = 1,
        sync: Any = None,
        tensorboard: Any = None,
        per_sample: bool | int = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Analyzer needs an nn.Module, got {type(model).__name__}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.model = model
        self.save_path = Path(save_path)
        self.index = LayerIndex(model)
        self.track_weights = weights
        self.histogram_bins = histogram_bins
        self.quantiles = tuple(quantiles)
        self.scaler = scaler
        self.flush_every = flush_every
        self._tracked = self.index.select(layers)
        self.input_size = tuple(input_size) if input_size is not None else None
        self._output_shapes = self._probe_shapes(input_size) if input_size is not None else {}
        self.sync = sync
        self.writer = RunWriter(self.save_path) if sync is None else sync.open_writer(self.save_path)
        self.writer.set_layers(
            [
                (
                    L.id,
                    L.name,
                    L.type_name,
                    L.num_params,
                    str(self._output_shapes[L.id]) if L.id in self._output_shapes else None,
                )
                for L in self.index
            ]
        )
        self.writer.set_meta("model", type(model).__name__)
        self._step = self.writer.next_step()
        last = self.writer.last_epoch()
        self._epoch = 0 if last is None else last + 1
        self._epoch_first_step: int | None = None
        self._hooks = HookManager()
        self._params = self._collect_params()
        self._by_layer: dict[int, list[_Param]] = {}
        for p in self._params:
            self._by_layer.setdefault(p.layer_id, []).append(p)
        self._stat_ids = [self.writer.stat_id(s) for s in GRAD_STATS]
        self._ratio_stat = self.writer.stat_id("update_ratio")
        self._acc = EpochAccumulator(len(self._params), len(GRAD_STATS))
        self._grad_order: list[int] = []
        self._accumulated = 0
        for p in self._params:
            if p.tensor.requires_grad:
                self._hooks.add(p.tensor.register_post_accumulate_grad_hook(self._order_hook(p.row)))
        self._snapshot: list[torch.Tensor] | None = None
        self._ratio_label: tuple[int, int] | None = None
        self._hist_ranges: dict[int, tuple[float, float]] = {}
        self._last_grad_fn: Any = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._activations = ActivationWatcher(self.index, self.writer, self._hooks)
        self._pruned: list[tuple[nn.Module, str]] = []
        from bbdecoder.monitor.tensorboard import tensorboard_logger

        self.tensorboard = tensorboard_logger(tensorboard, self.save_path, sync)
        # sources of extra per-step rows (per-sample statistics, the ranks' noise scale): .rows(step, epoch)
        self._row_sources: list[Any] = []
        self._per_sample = per_sample_recorder(
            per_sample,
            model,
            self._params,
            self.writer,
            self._step,
            hooks=self._hooks,
            pause=self.paused,
            distributed=sync is not None,
        )
        if self._per_sample is not None:
            self._row_sources.append(self._per_sample)
        self.closed = False
        if activations is not None and activations is not False:
            selection = None if activations is True else activations
            self.watch_activations(selection, dead_threshold, saturation_eps, channel_dim)
        self.writer.flush()

    # -- set-up -------------------------------------------------------------------------------
    def _collect_params(self) -> list[_Param]:
        params: list[_Param] = []
        seen: set[int] = set()
        for layer in self._tracked:
            for pname, tensor in layer.module.named_parameters(recurse=False):
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                name = f"{layer.name}.{pname}" if layer.name else pname
                sid = self.writer.series_id(layer.id, name)
                params.append(_Param(len(params), layer.id, layer.name, name, tensor, sid))
        return params

    def _order_hook(self, row: int) -> Callable[[torch.Tensor], None]:
        def hook(_tensor: torch.Tensor) -> None:
            self._grad_order.append(row)
            self._accumulated += 1

        return hook

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
    def forward_propagation(self, *inputs: Any, **kwargs: Any) -> Any:
        """``model(*inputs, **kwargs)`` (activation hooks record when watching)."""
        self._check_open()
        return self.model(*inputs, **kwargs)

    def backward_propagation(
        self,
        loss: torch.Tensor,
        collect_grads: bool = True,
        layer_inds: LayerSelection = None,
        *,
        layers: LayerSelection = None,
        retain_graph: bool = False,
    ) -> None:
        """``loss.backward()``, then (``collect_grads``) record the gradient statistics of the
        selected layers (``layers=`` and ``layer_inds=`` are synonyms; ``None``: every tracked layer)."""
        self._check_open()
        if layer_inds is not None and layers is not None and layer_inds != layers:
            raise ValueError("pass the layer selection as layers= or layer_inds=, not both")
        selection = layers if layers is not None else layer_inds
        selected = self._select_params(selection)  # validate before the graph is consumed
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first "
                "(loss.mean() or loss.sum())"
            )
        if loss.grad_fn is None:
            raise ValueError("loss does not require grad: it was computed without a graph (torch.no_grad?)")
        if loss.grad_fn is self._last_grad_fn:
            raise RuntimeError(
                "backward_propagation was already called on this loss and its graph is freed; run a new "
                "forward pass, or pass retain_graph=True to the first call"
            )
        loss.backward(retain_graph=retain_graph)
        self._last_grad_fn = None if retain_graph else loss.grad_fn
        if collect_grads:
            self._record_step(selected, loss.detach())

    def save_collected_grads(
        self, save_folder: str | Path | None = None, ep: int | None = None
    ) -> list[Path]:
        """End epoch ``ep``: store per-epoch aggregates, weight histograms/quantiles and activation
        statistics, then draw the gradient figures of that epoch into ``save_folder`` (default
        ``<save_path>/figures``). Returns the figure paths."""
        epoch = self.end_epoch(ep)
        from bbdecoder.viz.monitor_plots import plot_grad_norms, plot_gradient_flow

        folder = Path(save_folder) if save_folder is not None else self.save_path / "figures"
        return [
            plot_gradient_flow(self.save_path, folder, epoch),
            plot_grad_norms(self.save_path, folder, epoch),
        ]

    def visualize_weight_hist(
        self,
        save_folder: str | Path | None = None,
        layer_inds: LayerSelection = None,
        *,
        layers: LayerSelection = None,
        style: str = "heatmap",
    ) -> list[Path]:
        """Draw each selected parameter's weight histograms over epochs (``style``: ``"heatmap"`` or
        ``"ridge"``), one file per parameter. Records the current weights first when no histogram
        was stored yet. Returns the figure paths."""
        self._check_open()
        selection = layers if layers is not None else layer_inds
        params = self._select_params(selection)
        if not self.writer.has_histograms():
            self._record_weights(self._params, max(self._step - 1, 0), self._epoch)
            self.writer.flush()
        from bbdecoder.viz.monitor_plots import plot_weight_histograms

        folder = Path(save_folder) if save_folder is not None else self.save_path / "figures"
        return plot_weight_histograms(self.save_path, folder, params=[p.name for p in params], style=style)

    # -- plain training loops -----------------------------------------------------------------
    def step(self, layers: LayerSelection = None, loss: torch.Tensor | None = None) -> None:
        """Record this iteration's gradient statistics (call after ``loss.backward()``, before
        ``optimizer.step()``). ``loss`` (optional) is stored with the step."""
        self._check_open()
        selected = self._select_params(layers)
        self._record_step(selected, loss.detach() if loss is not None else None)

    def attach(self, optimizer: torch.optim.Optimizer) -> Analyzer:
        """Record automatically just before each ``optimizer.step()`` (hook removed by :meth:`close`)."""
        self._check_open()
        self._optimizers.append(optimizer)
        self._hooks.add(optimizer.register_step_pre_hook(lambda *_: self.step()))
        return self

    def end_epoch(self, ep: int | None = None) -> int:
        """Close the current epoch (numbered ``ep`` when given) and store its aggregates; returns the
        epoch number. Raises :class:`EmptyEpochError` when no step was recorded in it."""
        self._check_open()
        if self._epoch_first_step is None:
            raise EmptyEpochError(
                f"epoch {self._epoch if ep is None else ep} has no recorded steps: call "
                "backward_propagation(loss, collect_grads=True) or step() during the epoch first"
            )
        first, last = self._epoch_first_step, self._step - 1
        if ep is not None and ep != self._epoch:
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
        self._acc = EpochAccumulator(len(self._params), len(GRAD_STATS))
        self._epoch_first_step = None
        self._epoch = epoch + 1
        return epoch

    # -- recording ----------------------------------------------------------------------------
    def _select_params(self, selection: LayerSelection) -> list[_Param]:
        if selection is None:
            return self._params
        layers = self.index.select(selection)
        missing = [L for L in layers if L.id not in self._by_layer and L.num_params > 0]
        if missing and len(self._tracked) < len(self.index):
            raise KeyError(
                f"layers {[L.display_name for L in missing]} are not tracked by this Analyzer; add them to "
                "Analyzer(..., layers=...)"
            )
        return [p for L in layers for p in self._by_layer.get(L.id, [])]

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
        grad_stats_fn = getattr(self.sync, "grad_statistics", grad_statistics)  # sharded: ShardSync's
        stats = grad_stats_fn([p.tensor.grad for p in with_grad], self._inv_scale())  # type: ignore[misc]
        parts = [stats.reshape(-1).double()]
        ratio_label, ratio_n = self._ratio_label, 0
        if self.track_weights:
            current = [p.tensor.detach() for p in self._params]
            if self._snapshot is None:
                self._snapshot = [t.clone() for t in current]
            elif ratio_label is not None:
                ratios = getattr(self.sync, "update_ratios", update_ratios)(self._snapshot, current)
                parts.append(ratios.double().to(stats.device))
                ratio_n = len(ratios)
            self._ratio_label = None
        if loss is not None:
            parts.append(loss.reshape(1).double().to(stats.device))
        stacked = torch.cat(parts) if self.sync is None else self.sync.reduce_step(torch.cat(parts))
        host = stacked.cpu().numpy()  # the one device -> host copy of this step

        step, epoch = self._step, self._epoch
        n = len(with_grad)
        values = host[: n * len(GRAD_STATS)].reshape(n, len(GRAD_STATS))
        rows = [
            (step, epoch, p.series_id, sid, float(v))
            for p, vals in zip(with_grad, values, strict=True)
            for sid, v in zip(self._stat_ids, vals, strict=True)
        ]
        if ratio_n and ratio_label is not None:
            ratio_vals = host[n * len(GRAD_STATS) : n * len(GRAD_STATS) + ratio_n]
            rows += [
                (ratio_label[0], ratio_label[1], p.series_id, self._ratio_stat, float(v))
                for p, v in zip(self._params, ratio_vals, strict=True)
            ]
        for source in self._row_sources:
            rows += source.rows(step, epoch)
        self.writer.add_step(step, epoch, float(host[-1]) if loss is not None else None)
        self.writer.add_scalars(rows)
        if self.tensorboard is not None:
            self.tensorboard.record_step(
                step,
                [p.name for p in with_grad],
                values,
                float(host[-1]) if loss is not None else None,
                {p.name: p.tensor for p in self._params},
            )
        self._acc.update(np.array([p.row for p in with_grad]), values)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            self._report_nonfinite([p for p, b in zip(with_grad, bad, strict=True) if b])
        if self._epoch_first_step is None:
            self._epoch_first_step = step
        if self.track_weights:
            self._ratio_label = (step, epoch)
        self._grad_order.clear()
        self._accumulated = 0
        self._step += 1
        if self._step % self.flush_every == 0:
            self.writer.flush()

    def _report_nonfinite(self, bad: list[_Param]) -> None:
        bad_rows = {p.row for p in bad}
        ordered = [r for r in dict.fromkeys(self._grad_order) if r in bad_rows]
        first_row = ordered[0] if ordered else max(bad_rows)  # no order recorded: last declared first
        first = self._params[first_row]
        message = (
            f"non-finite gradient at step {self._step}: first in backward order is layer "
            f"[{first.layer_id}] {first.layer} ({first.name}); {len(bad)} parameter tensor(s) affected"
        )
        self.writer.add_event(
            "nonfinite_grad",
            message,
            step=self._step,
            epoch=self._epoch,
            layer_id=first.layer_id,
            param=first.name,
            data={"affected": [p.name for p in bad]},
        )
        if self.scaler is None:  # with a GradScaler, overflow steps are expected and skipped
            warnings.warn(message, NonFiniteGradientWarning, stacklevel=4)

    def _flush_ratio(self) -> None:
        """Measure the update made after the last recorded step (its ``optimizer.step()``)."""
        if self._snapshot is None or self._ratio_label is None:
            return
        ratios = getattr(self.sync, "update_ratios", update_ratios)(
            self._snapshot, [p.tensor.detach() for p in self._params]
        )
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
    def watch_activations(
        self,
        layers: LayerSelection = None,
        threshold: float = 0.0,
        eps: float = 1e-3,
        dim: int = 1,
    ) -> None:
        """Watch the outputs of ``layers`` (forward hooks, removed by :meth:`close`). Only forwards in
        training mode are recorded (evaluation passes in eval mode are not). Per epoch the store gets
        ``dead_fraction``/``dead_count`` (a unit is dead when its output was ``<= threshold`` for every
        sample and position), ``saturated_fraction`` (activation modules) and ``channel_var``."""
        self._check_open()
        self._activations.watch(self.index.select(layers), threshold, eps, dim)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block, forward passes are not recorded by the activation hooks."""
        old, self._activations.paused = self._activations.paused, True
        try:
            yield
        finally:
            self._activations.paused = old

    def dead_units(self, threshold: float | None = None) -> dict[str, list[int]]:
        """``{layer name: dead channel indices}`` from the current epoch's data (or, when none was
        seen yet, the last finished epoch). ``threshold`` overrides the watch threshold."""
        dead = self._activations.dead_by_id(threshold)
        return {self.index[lid].display_name: units for lid, units in dead.items()}

    def get_sim(self, inputs: Any, layer: int | str, dim: int = 1) -> torch.Tensor:
        """Cosine similarity ``(C, C)`` between the channels of ``layer``'s output on ``inputs``
        (one forward, no_grad, eval mode, model restored)."""
        chosen = self.index.select(layer)
        if len(chosen) != 1:
            raise ValueError(f"get_sim needs exactly one layer, {layer!r} selects {len(chosen)}")
        info = chosen[0]
        captured: list[torch.Tensor] = []
        with (
            HookManager() as hooks,
            preserved_state(self.model, eval_mode=True),
            torch.no_grad(),
            self.paused(),
        ):
            hooks.forward_hook(info.module, lambda _m, _i, out: captured.append(out))
            self.model(inputs)
        if not captured:
            raise RuntimeError(f"layer {info.display_name} did not run in the forward pass")
        return channel_similarity(captured[0], dim)

    # -- pruning ------------------------------------------------------------------------------
    def prune_dead(
        self,
        layers: LayerSelection = None,
        threshold: float | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
    ) -> PruneReport:
        """Mask the dead units of watched ``layers`` with ``torch.nn.utils.prune`` and report them.

        The producer of a dead channel is the layer itself when it has a weight with that many
        output channels, else the nearest preceding leaf (in declaration order) that has one (e.g.
        the BatchNorm or Conv before a ReLU). This **modifies the model by design** (``_orig``
        parameters, ``_mask`` buffers, pre-hooks); :meth:`make_pruning_permanent` folds the masks.
        ``evaluate(model) -> float`` is called before and after (recording paused, modes restored).
        """
        self._check_open()
        dead = self._activations.dead_by_id(threshold)
        wanted = {L.id for L in self.index.select(layers)}
        report = PruneReport()
        if evaluate is not None:
            report.accuracy_before = self._evaluate(evaluate)
        for layer_id, channels in dead.items():
            if layer_id not in wanted or not channels:
                continue
            layer = self.index[layer_id]
            name = layer.display_name
            cmax = self._activations.channel_max(layer_id)
            assert cmax is not None
            producer = self._producer(layer, len(cmax))
            if producer is None:
                warnings.warn(
                    f"no layer with a weight produces the channels of {name}; not pruned", stacklevel=2
                )
                continue
            pruned = mask_channels(producer.module, channels)
            self._pruned += [(producer.module, n) for n in pruned]
            report.entries.append(PrunedUnits(layer.id, name, channels, producer.display_name, pruned))
        if evaluate is not None:
            report.accuracy_after = self._evaluate(evaluate)
        self.writer.add_event(
            "prune",
            str(report),
            step=self._step - 1,
            epoch=self._epoch,
            data={
                "entries": [e.__dict__ for e in report.entries],
                "before": report.accuracy_before,
                "after": report.accuracy_after,
            },
        )
        self.writer.flush()
        return report

    def _producer(self, layer: LayerInfo, channels: int) -> LayerInfo | None:
        for candidate in reversed(list(self.index)[: layer.id + 1]):
            if output_channels(candidate.module) == channels:
                return candidate
        return None

    def _evaluate(self, evaluate: Callable[[nn.Module], float]) -> float:
        with preserved_state(self.model), self.paused():
            return float(evaluate(self.model))

    def make_pruning_permanent(self) -> None:
        """Fold the pruning masks into plain parameters and remove the pruning hooks."""
        make_permanent(self._pruned)
        self._pruned.clear()

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
        was given); printed and returned. ``cost=True`` adds FLOPs and the median forward time per
        layer (measured on zeros of ``input_size``, see :meth:`layer_costs`)."""
        costs = {c.id: c for c in self.layer_costs()} if cost else {}
        extra = f"  {'MFLOPs':>10} {'ms':>8}" if cost else ""
        lines = [f"{'ID':>4}  {'name':<40} {'type':<18} {'params':>10}{extra}  output shape"]
        for L in self.index:
            shape = str(self._output_shapes.get(L.id, "")) if self._output_shapes else ""
            measured = f"  {costs[L.id].flops / 1e6:>10.3f} {costs[L.id].forward_ms:>8.3f}" if cost else ""
            name = f"{L.id:>4}  {L.display_name:<40} {L.type_name:<18}"
            lines.append(f"{name} {L.num_params:>10}{measured}  {shape}")
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
            if self._epoch_first_step is not None:
                self.end_epoch()
            else:
                self._flush_ratio()
        finally:
            self._hooks.remove_all()
            if self.tensorboard is not None:
                self.tensorboard.close()
            self._snapshot = None
            self.writer.close()
            self.closed = True

    def __enter__(self) -> Analyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Master_analyzer = Analyzer
"""The seed's name for :class:`Analyzer`."""
