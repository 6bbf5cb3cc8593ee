"""The training monitor for Keras 3 (TensorFlow backend): the same statistics, in the same run store,
as the PyTorch :class:`~bbdecoder.monitor.Analyzer`, so ``open_run`` and the figures work unchanged.

Callbacks never see gradients or layer outputs. For the length of ``fit``, :class:`MonitorCallback`
therefore shadows (instance attributes only, removed afterwards) the optimizer's ``apply`` (which
Keras' own ``train_step`` reaches through ``apply_gradients``, as do custom ``train_step`` methods
that call ``optimizer.apply``/``apply_gradients``), ``model.train_step`` (to know when a forward
belongs to a training step) and the ``call`` of the tracked and watched layers, then retraces the
train function. Inside the compiled step each step writes the six gradient statistics, the update
ratio and a finiteness flag of every tracked variable into one small ``tf.Variable`` buffer (copied
to the host once per executed batch), and watched layers update their activation accumulators
(read once per epoch). The model's own ``train_step`` runs unchanged: loss scaling, sample weights
and metrics are Keras', and the weights are bit-identical to a run without the callback.

Names (columns of ``open_run(path).scalars()``):

- ``layer_id``: the layer's position in :func:`bbdecoder.keras.layers.leaf_layers` (layers without
  sub-layers, depth first, input layers excluded) - the IDs the Keras explainers use.
- ``layer``: the layer's qualified name, the names of the nested layers from the model (excluded)
  down, joined by ``.`` (``dense_1``, ``block.conv``).
- ``param``: ``<layer>.<variable name>`` (``dense_1.kernel``, ``block.conv.bias``), the Keras
  counterpart of a PyTorch ``state_dict`` name; ``""`` for a layer's output (activation statistics).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.layers import check_model, leaf_layers
from bbdecoder.keras.monitor_activations import ActivationProbe, ActivationRecorder
from bbdecoder.keras.monitor_patch import OWNER_ATTRIBUTE, Shadows, installed_by
from bbdecoder.monitor import NonFiniteGradientWarning
from bbdecoder.monitor.grad_stats import GRAD_STATS, EpochAccumulator
from bbdecoder.monitor.weights import QUANTILES, fixed_range, histogram, weight_stat_names, weight_statistics
from bbdecoder.store.writer import RunWriter

try:  # Keras' own test for "this call only computes output shapes" (compute_output_spec)
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope
except ImportError:  # pragma: no cover - other Keras layouts

    def in_symbolic_scope() -> bool:
        return False


_NSTATS = len(GRAD_STATS)
_RATIO, _FINITE = _NSTATS, _NSTATS + 1  # buffer columns after the six statistics
_COLUMNS = _NSTATS + 2

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class _Tracked:
    row: int
    layer_id: int
    layer: str
    name: str
    variable: Any
    series_id: int


def qualified_layer_names(model: Any) -> dict[int, str]:
    """``{id(layer): qualified name}`` for every layer nested in ``model`` (names joined by ``.``)."""
    names: dict[int, str] = {}

    def walk(layer: Any, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in names:
                continue
            name = f"{prefix}.{child.name}" if prefix else child.name
            names[id(child)] = name
            walk(child, name)

    walk(check_model(model), "")
    return names


def gradient_statistics(grad: Any) -> Any:
    """The six statistics of one gradient as a float32 ``(6,)`` tensor, in :data:`GRAD_STATS` order:
    mean, mean |g|, max |g|, population variance (two-pass), L1, L2."""
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    g = grad if grad.dtype in (tf.float32, tf.float64) else tf.cast(grad, tf.float32)
    n = tf.cast(tf.size(g), g.dtype)
    mean = tf.reduce_sum(g) / n
    magnitude = tf.abs(g)
    l1 = tf.reduce_sum(magnitude)
    var = tf.reduce_sum(tf.square(g - mean)) / n
    l2 = tf.sqrt(tf.reduce_sum(tf.square(g)))
    return tf.cast(tf.stack([mean, l1 / n, tf.reduce_max(magnitude), var, l1, l2]), tf.float32)


def _all_finite(grad: Any) -> Any:
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    return tf.cast(tf.reduce_all(tf.math.is_finite(values)), tf.float32)


def _first_tensor(outputs: Any) -> Any:
    if tf.is_tensor(outputs):
        return outputs
    if isinstance(outputs, (list, tuple)):
        return next((o for o in outputs if tf.is_tensor(o)), None)
    if isinstance(outputs, dict):
        return next((o for o in outputs.values() if tf.is_tensor(o)), None)
    return None


def _closing_on_error(method: _F) -> _F:
    """A callback method that restores the model and closes the store before an error propagates
    (Keras does not call ``on_train_end`` when ``fit`` raises)."""

    @functools.wraps(method)
    def guarded(self: MonitorCallback, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            self._abort(error)
            raise

    return guarded  # type: ignore[return-value]


class MonitorCallback(keras.callbacks.Callback):
    """Record gradient statistics, update ratios, weight histograms and (opt-in) activation
    statistics of a Keras model during ``fit``.

    Per step (each tracked trainable variable): ``mean``, ``mean_abs``, ``max_abs``, ``var``,
    ``l1``, ``l2`` of its gradient (as applied; with a ``LossScaleOptimizer`` the unscaled one)
    and ``update_ratio`` = ||W_after - W_before|| / ||W_before|| of that step; the step's loss (the
    loss Keras' ``train_step`` passed to ``optimizer.scale_loss``; NaN for a custom ``train_step``
    that does not). Per epoch: the mean and variance of each gradient statistic across the epoch's
    steps, and weight histograms on fixed bins, ``weight_mean``, ``weight_std``, ``weight_l2`` and
    quantiles, computed by the same functions as the PyTorch monitor.

    Activations (``activations=True`` or a selection of leaf layers), per epoch, stored under
    ``param ""`` exactly as the PyTorch ``Analyzer`` stores them: ``dead_fraction`` and
    ``dead_count`` (a channel is dead when the layer's output was ``<= dead_threshold`` for every
    sample and position of the epoch's training steps; channels along ``channel_axis``, the last
    by default), ``saturated_fraction`` (layers whose output is a sigmoid, tanh, ReLU, relu6,
    hard_sigmoid or hard_tanh, fused ``activation=`` included; NaN otherwise) and ``channel_var``
    (variance across channels of the channel means, averaged over forwards), plus a ``dead_units``
    event per layer with dead channels. Only forwards inside the training step count (validation
    and ``predict`` do not).

    Non-finite gradients: a step where a tracked variable's gradient holds NaN/Inf stores a
    ``nonfinite_grad`` event naming the first affected layer in backward order (the reverse of the
    order in which the traced forward called the layers) and warns with
    :class:`~bbdecoder.monitor.NonFiniteGradientWarning` (not under a ``LossScaleOptimizer``,
    where overflowing steps are expected and skipped).

    The model is restored when ``fit`` ends and also when the train step or this callback raises;
    if ``fit`` is left by an error elsewhere (another callback, an interrupt between steps), call
    :meth:`close` or use the callback as a context manager (``with MonitorCallback(p) as cb:``); a
    later ``MonitorCallback`` on the same model also removes a stale installation first.

    With ``steps_per_execution=k`` Keras calls callbacks once per k steps; every step is still
    stored (the buffer holds k steps).

    Args:
        save_path: folder of the run store (created; an existing store is appended to).
        layers: leaf layers whose variables are tracked: IDs, names, layer objects, or a list of
            these (``None``: all).
        gradients: record the per-step gradient statistics.
        weights: record update ratios and the per-epoch weight statistics and histograms.
        activations: leaf layers whose outputs are watched: ``True`` (all), ``False``/``None``
            (none), or IDs, names, layer objects or a list of these.
        dead_threshold, saturation_eps: the activation settings of the PyTorch monitor.
        channel_axis: the channel axis of watched outputs (channels last: ``-1``).
        histogram_bins, quantiles, flush_every: as for the PyTorch ``Analyzer``.
    """

    def __init__(
        self,
        save_path: str | Path = "bbdecoder_run",
        layers: Any = None,
        *,
        gradients: bool = True,
        weights: bool = True,
        activations: Any = False,
        dead_threshold: float = 0.0,
        saturation_eps: float = 1e-3,
        channel_axis: int = -1,
        histogram_bins: int = 64,
        quantiles: tuple[float, ...] = QUANTILES,
        flush_every: int = 1,
    ) -> None:
        super().__init__()
        if not (gradients or weights or activations not in (False, None)):
            raise ValueError("nothing to record: set gradients=True, weights=True or activations=...")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if not 0 <= saturation_eps < 0.5:
            raise ValueError(f"saturation_eps must be in [0, 0.5), got {saturation_eps}")
        self.save_path = Path(save_path)
        self.layers = layers
        self.gradients = gradients
        self.weights = weights
        self.activations = activations
        self.dead_threshold = float(dead_threshold)
        self.saturation_eps = float(saturation_eps)
        self.channel_axis = int(channel_axis)
        self.histogram_bins = histogram_bins
        self.quantiles = tuple(quantiles)
        self.flush_every = flush_every
        self.writer: RunWriter | None = None
        self.dead_units: dict[str, list[int]] = {}
        """``{layer name: dead channel indices}`` of the last recorded epoch (watched layers)."""
        self._shadows = Shadows()
        self._installed_on: Any = None
        self._in_step = False
        self._forward_order: list[int] = []

    # -- lifetime -----------------------------------------------------------------------------
    def __enter__(self) -> MonitorCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the model and optimizer and close the store (idempotent; called by ``fit``'s end)."""
        self._restore()
        if self.writer is not None:
            self.writer.set_meta("finished", time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.writer.close()
            self.writer = None

    def _abort(self, error: BaseException) -> None:
        self._restore()
        if self.writer is not None:
            try:
                self.writer.set_meta("aborted", f"{type(error).__name__}: {error}"[:500])
                self.writer.close()
            finally:
                self.writer = None

    def _restore(self) -> None:
        self._shadows.restore()
        self._in_step = False
        model, self._installed_on = self._installed_on, None
        if model is not None and getattr(model.train_function, OWNER_ATTRIBUTE, None) is self:
            model.train_function = None  # the next fit compiles Keras' plain step again

    # -- set-up -------------------------------------------------------------------------------
    def _select(self, model: Any, selection: Any) -> list[tuple[int, Any]]:
        leaves = list(enumerate(leaf_layers(model)))
        if selection is None or selection is True:
            return leaves
        wanted = selection if isinstance(selection, (list, tuple)) else [selection]
        chosen: dict[int, Any] = {}
        for selector in wanted:
            found = [
                (i, layer)
                for i, layer in leaves
                if layer is selector
                or (isinstance(selector, str) and layer.name == selector)
                or (isinstance(selector, int) and not isinstance(selector, bool) and i == selector)
            ]
            if not found:
                names = ", ".join(f"[{i}] {layer.name}" for i, layer in leaves)
                raise ValueError(f"no leaf layer matches {selector!r}; the model's leaf layers: {names}")
            chosen.update(found)
        return sorted(chosen.items(), key=lambda item: item[0])

    @_closing_on_error
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        self._release_stale(model)
        unbuilt = [layer.name for layer in model._flatten_layers() if not layer.built]
        if unbuilt:
            raise ValueError(
                f"MonitorCallback needs a built model to find its variables, but {unbuilt} are not built "
                "(a subclassed model builds on its first batch); call model.build(input_shape) or run "
                "the model on one batch before fit"
            )
        names = qualified_layer_names(model)
        self.writer = writer = RunWriter(self.save_path)
        leaves = leaf_layers(model)
        writer.set_layers(
            [
                (
                    i,
                    names.get(id(layer), layer.name),
                    type(layer).__name__,
                    int(sum(math.prod(v.shape) for v in layer.weights)),
                    None,
                )
                for i, layer in enumerate(leaves)
            ]
        )
        writer.set_meta("model", type(model).__name__)
        writer.set_meta("framework", "keras")
        self._layer_ids = {id(layer): i for i, layer in enumerate(leaves)}
        self._tracked: list[_Tracked] = []
        seen: set[int] = set()
        for layer_id, layer in self._select(model, self.layers):
            qualified = names.get(id(layer), layer.name)
            for variable in layer.trainable_weights:
                if id(variable) in seen:
                    continue
                seen.add(id(variable))
                param = f"{qualified}.{variable.name}"
                sid = writer.series_id(layer_id, param)
                self._tracked.append(_Tracked(len(self._tracked), layer_id, qualified, param, variable, sid))
        if not self._tracked and (self.gradients or self.weights):
            raise ValueError("the selected layers have no trainable variables: nothing to record")
        self._recorder = ActivationRecorder(writer)
        if self.activations not in (False, None):
            for layer_id, layer in self._select(model, self.activations):
                self._recorder.watch(
                    ActivationProbe(
                        layer_id,
                        names.get(id(layer), layer.name),
                        layer,
                        self.dead_threshold,
                        self.saturation_eps,
                        self.channel_axis,
                    )
                )
        self._stat_ids = [writer.stat_id(s) for s in GRAD_STATS]
        self._ratio_stat = writer.stat_id("update_ratio")
        self._step = writer.next_step()
        last = writer.last_epoch()
        self._epoch0 = 0 if last is None else last + 1
        self._epoch_first_step: int | None = None
        self._acc = EpochAccumulator(len(self._tracked), _NSTATS)
        self._hist_ranges: dict[int, tuple[float, float]] = {}
        self.dead_units = {}
        k = int(getattr(model, "steps_per_execution", 1) or 1)
        self._k = k
        self._buffer = tf.Variable(tf.fill((k, len(self._tracked), _COLUMNS), np.nan), trainable=False)
        self._losses = tf.Variable(tf.fill((k,), np.nan), trainable=False)
        self._pending_loss = tf.Variable(np.float32(np.nan), trainable=False)
        self._counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._read = 0
        self._current_epoch = 0
        writer.flush()
        self._install(model, leaves)

    def _release_stale(self, model: Any) -> None:
        """Close what an earlier ``fit`` left installed (this callback's or another monitor's)."""
        if self._shadows or self.writer is not None:
            self.close()
        optimizer = getattr(model, "optimizer", None)
        for owner, name in ((model, "train_step"), (optimizer, "apply")):
            stale = installed_by(owner, name) if owner is not None else None
            if stale is not None and stale is not self:
                stale.close()

    def _install(self, model: Any, leaves: list[Any]) -> None:
        optimizer = model.optimizer
        if optimizer is None:
            raise ValueError("the model has no optimizer: compile it before fit")
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self._installed_on = model
        shadow = self._shadows
        shadow.set(optimizer, "apply", self._recording_apply(optimizer))
        shadow.set(optimizer, "scale_loss", self._recording_scale_loss(optimizer.scale_loss))
        shadow.set(model, "train_step", self._marking_train_step(model.train_step))
        intercepted = {t.layer_id for t in self._tracked} | set(self._recorder.probes)
        for layer_id in sorted(intercepted):
            layer = leaves[layer_id]
            shadow.set(layer, "call", self._observing_call(layer_id, layer.call))
        model.make_train_function(force=True)  # retrace so the compiled step includes the recorder
        model.train_function = self._guarded(model.train_function)

    def _owned(self, fn: _F) -> _F:
        setattr(fn, OWNER_ATTRIBUTE, self)
        return fn

    def _recording_apply(self, optimizer: Any) -> Callable[..., Any]:
        original_apply = optimizer.apply
        rows = {id(t.variable): t.row for t in self._tracked}

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            if trainable_variables is None:  # Keras then applies to its own variable list
                trainable_variables = optimizer._trainable_variables
            grads, variables = list(grads), list(trainable_variables)
            picked = [
                (rows[id(v)], g, v)
                for g, v in zip(grads, variables, strict=True)
                if id(v) in rows and g is not None
            ]
            slot = self._counter % self._k
            columns = []
            if self.gradients and picked:
                stats = tf.stack([gradient_statistics(g) for _, g, _ in picked])
                if self._loss_scaled:
                    # the scale the loss was multiplied by (built lazily by the first apply, as in Keras)
                    scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
                    inv = 1.0 / tf.cast(scale, tf.float32)
                    stats = stats * tf.stack([inv, inv, inv, inv * inv, inv, inv])
                columns.append(stats)
            else:
                columns.append(tf.fill((len(picked), _NSTATS), np.float32(np.nan)))
            finite = [_all_finite(g) for _, g, _ in picked]
            before = [tf.identity(v.value) for _, _, v in picked] if self.weights else []
            result = original_apply(grads, variables)
            if self.weights and picked:
                ratios = [
                    tf.norm(tf.cast(v.value - b, tf.float32)) / tf.norm(tf.cast(b, tf.float32))
                    for (_, _, v), b in zip(picked, before, strict=True)
                ]
                columns.append(tf.reshape(tf.stack(ratios), (-1, 1)))
            else:
                columns.append(tf.fill((len(picked), 1), np.float32(np.nan)))
            table = tf.fill((len(self._tracked), _COLUMNS), np.float32(np.nan))
            if picked:
                columns.append(tf.reshape(tf.stack(finite), (-1, 1)))
                index = tf.constant([[r] for r, _, _ in picked], dtype=tf.int32)
                table = tf.tensor_scatter_nd_update(table, index, tf.concat(columns, axis=1))
            self._buffer[slot].assign(table)
            self._losses[slot].assign(self._pending_loss)  # NaN when scale_loss was not called
            self._pending_loss.assign(np.float32(np.nan))
            self._counter.assign_add(1)
            return result

        return self._owned(apply)

    def _recording_scale_loss(self, original_scale: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def scale_loss(loss: Any) -> Any:
            self._pending_loss.assign(tf.cast(tf.reshape(loss, ()), tf.float32))
            return original_scale(loss)

        return self._owned(scale_loss)

    def _marking_train_step(self, original_step: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Layer calls made inside this function belong to a training step (traced or eager)."""

        def train_step(data: Any) -> Any:
            self._in_step = True
            self._forward_order.clear()
            try:
                return original_step(data)
            finally:
                self._in_step = False

        return self._owned(train_step)

    def _observing_call(self, layer_id: int, original_call: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            outputs = original_call(*args, **kwargs)
            if not self._in_step or in_symbolic_scope():
                return outputs
            if layer_id not in self._forward_order:
                self._forward_order.append(layer_id)
            probe = self._recorder.probes.get(layer_id)
            tensor = _first_tensor(outputs) if probe is not None else None
            if probe is not None and tensor is not None and not isinstance(tensor, keras.KerasTensor):
                with tf.name_scope("bbdecoder_activations"):
                    probe.update(tensor)
            return outputs

        return self._owned(call)

    def _guarded(self, compiled: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The train function, restoring everything when a step raises (end of data excepted)."""

        def train_function(iterator: Any) -> Any:
            try:
                return compiled(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise
            except BaseException as error:
                self._abort(error)
                raise

        return self._owned(train_function)

    # -- per batch and per epoch --------------------------------------------------------------
    @_closing_on_error
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.writer is not None
        count = int(self._counter.numpy())
        new = count - self._read
        if new <= 0:
            return
        if new > self._k:
            raise RuntimeError(
                f"{new} steps ran between two callbacks, more than steps_per_execution={self._k}"
            )
        table, losses = self._buffer.numpy().astype(np.float64), self._losses.numpy().astype(np.float64)
        epoch = self._epoch0 + self._current_epoch
        for offset in range(new):
            slot = (self._read + offset) % self._k
            values = table[slot]
            loss = float(losses[slot])
            self.writer.add_step(self._step, epoch, loss if np.isfinite(loss) else None)
            rows = []
            for t in self._tracked:
                if self.gradients:
                    rows += [
                        (self._step, epoch, t.series_id, sid, float(v))
                        for sid, v in zip(self._stat_ids, values[t.row, :_NSTATS], strict=True)
                    ]
                if self.weights:
                    rows.append(
                        (self._step, epoch, t.series_id, self._ratio_stat, float(values[t.row, _RATIO]))
                    )
            self.writer.add_scalars(rows)
            if self.gradients:
                self._acc.update(np.arange(len(self._tracked)), values[:, :_NSTATS])
            bad = np.flatnonzero(values[:, _FINITE] == 0)
            if bad.size:
                self._report_nonfinite(self._step, epoch, [self._tracked[r] for r in bad])
            if self._epoch_first_step is None:
                self._epoch_first_step = self._step
            self._step += 1
            if self._step % self.flush_every == 0:
                self.writer.flush()
        self._read = count

    def _report_nonfinite(self, step: int, epoch: int, bad: list[_Tracked]) -> None:
        assert self.writer is not None
        position = {layer_id: i for i, layer_id in enumerate(self._forward_order)}
        # Backward order is the reverse of the forward: the affected layer called last comes first.
        first_layer = max(bad, key=lambda t: (position.get(t.layer_id, -1), t.layer_id)).layer_id
        first = next(t for t in bad if t.layer_id == first_layer)
        message = (
            f"non-finite gradient at step {step}: first in backward order is layer "
            f"[{first.layer_id}] {first.layer} ({first.name}); {len(bad)} parameter tensor(s) affected"
        )
        self.writer.add_event(
            "nonfinite_grad",
            message,
            step=step,
            epoch=epoch,
            layer_id=first.layer_id,
            param=first.name,
            data={"affected": [t.name for t in bad]},
        )
        if not self._loss_scaled:  # with dynamic loss scaling, overflowing steps are expected and skipped
            warnings.warn(message, NonFiniteGradientWarning, stacklevel=3)

    @_closing_on_error
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    @_closing_on_error
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.writer is not None
        if self._epoch_first_step is None:
            return
        stored_epoch, last = self._epoch0 + epoch, self._step - 1
        if self.gradients:
            mean, var, count = self._acc.result()
            rows = []
            for t in self._tracked:
                for j, sid in enumerate(self._stat_ids):
                    if count[t.row, j] > 0:
                        rows.append((stored_epoch, t.series_id, sid, "mean", float(mean[t.row, j])))
                        rows.append((stored_epoch, t.series_id, sid, "var", float(var[t.row, j])))
            self.writer.add_epoch_scalars(rows)
        if self.weights:
            self._record_weights(last, stored_epoch)
        dead = self._recorder.record(last, stored_epoch)
        self.dead_units = {self._recorder.probes[lid].name: units.tolist() for lid, units in dead.items()}
        self.writer.flush()
        self._acc = EpochAccumulator(len(self._tracked), _NSTATS)
        self._epoch_first_step = None

    def _record_weights(self, step: int, epoch: int) -> None:
        assert self.writer is not None
        stat_ids = [self.writer.stat_id(s) for s in weight_stat_names(self.quantiles)]
        tensors = [torch.from_numpy(np.asarray(t.variable.numpy())) for t in self._tracked]
        rows = []
        for t, w, vals in zip(
            self._tracked, tensors, weight_statistics(tensors, self.quantiles), strict=True
        ):
            rows += [(step, epoch, t.series_id, sid, float(v)) for sid, v in zip(stat_ids, vals, strict=True)]
            finite = w[torch.isfinite(w)]  # a diverged run's NaN/Inf weights are left out of the histogram
            if t.row not in self._hist_ranges:
                if not finite.numel():
                    continue
                self._hist_ranges[t.row] = fixed_range(finite)
            lo, hi = self._hist_ranges[t.row]
            self.writer.add_histogram(
                step, epoch, t.series_id, "weight", lo, hi, histogram(finite, lo, hi, self.histogram_bins)
            )
        self.writer.add_scalars(rows)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()


__all__ = ["MonitorCallback", "gradient_statistics", "qualified_layer_names"]
