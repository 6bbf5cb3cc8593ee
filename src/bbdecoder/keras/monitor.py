"""The training monitor for Keras 3 (TensorFlow backend): the same statistics, in the same run store,
as the PyTorch :class:`~bbdecoder.monitor.Analyzer`, so ``open_run`` and the figures work unchanged.

Callbacks never see gradients. :class:`MonitorCallback` therefore routes the optimizer's ``apply``
(which Keras' own ``train_step`` reaches through ``apply_gradients``, as do custom ``train_step``
methods that call ``optimizer.apply``/``apply_gradients``) through a recorder for the length of
``fit``: inside the compiled train function each step writes the six gradient statistics and the
update ratio of every tracked variable into one small ``tf.Variable`` buffer, and the callback
copies that buffer to the host once per executed batch. The model's own ``train_step`` runs
unchanged: loss scaling, sample weights and metrics are Keras'.

Names (columns of ``open_run(path).scalars()``):

- ``layer_id``: the layer's position in :func:`bbdecoder.keras.layers.leaf_layers` (layers without
  sub-layers, depth first, input layers excluded) - the IDs the Keras explainers use.
- ``layer``: the layer's qualified name, the names of the nested layers from the model (excluded)
  down, joined by ``.`` (``dense_1``, ``block.conv``).
- ``param``: ``<layer>.<variable name>`` (``dense_1.kernel``, ``block.conv.bias``), the Keras
  counterpart of a PyTorch ``state_dict`` name.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.layers import check_model, leaf_layers
from bbdecoder.monitor.grad_stats import GRAD_STATS, EpochAccumulator
from bbdecoder.monitor.weights import QUANTILES, fixed_range, histogram, weight_stat_names, weight_statistics
from bbdecoder.store.writer import RunWriter

_COLUMNS = len(GRAD_STATS) + 1  # the six gradient statistics, then the update ratio


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


class MonitorCallback(keras.callbacks.Callback):
    """Record gradient statistics, update ratios and weight histograms of a Keras model during ``fit``.

    Per step (each tracked trainable variable): ``mean``, ``mean_abs``, ``max_abs``, ``var``,
    ``l1``, ``l2`` of its gradient (as applied; with a ``LossScaleOptimizer`` the unscaled one)
    and ``update_ratio`` = ||W_after - W_before|| / ||W_before|| of that step; the step's loss (the
    loss Keras' ``train_step`` passed to ``optimizer.scale_loss``; NaN for a custom ``train_step``
    that does not). Per epoch: the mean and variance of each gradient statistic across the epoch's
    steps, and weight histograms on fixed bins, ``weight_mean``, ``weight_std``, ``weight_l2`` and
    quantiles, computed by the same functions as the PyTorch monitor.

    With ``steps_per_execution=k`` Keras calls callbacks once per k steps; every step is still
    stored (the buffer holds k steps).

    Args:
        save_path: folder of the run store (created; an existing store is appended to).
        layers: leaf layers to track: IDs, names, layer objects, or a list of these (``None``: all).
        gradients: record the per-step gradient statistics.
        weights: record update ratios and the per-epoch weight statistics and histograms.
        histogram_bins, quantiles, flush_every: as for the PyTorch ``Analyzer``.
    """

    def __init__(
        self,
        save_path: str | Path = "bbdecoder_run",
        layers: Any = None,
        *,
        gradients: bool = True,
        weights: bool = True,
        histogram_bins: int = 64,
        quantiles: tuple[float, ...] = QUANTILES,
        flush_every: int = 1,
    ) -> None:
        super().__init__()
        if not (gradients or weights):
            raise ValueError("nothing to record: set gradients=True or weights=True")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.save_path = Path(save_path)
        self.layers = layers
        self.gradients = gradients
        self.weights = weights
        self.histogram_bins = histogram_bins
        self.quantiles = tuple(quantiles)
        self.flush_every = flush_every
        self.writer: RunWriter | None = None
        self._installed: list[tuple[Any, str]] = []

    # -- set-up -------------------------------------------------------------------------------
    def _select(self, model: Any) -> list[tuple[int, Any]]:
        leaves = list(enumerate(leaf_layers(model)))
        if self.layers is None:
            return leaves
        wanted = self.layers if isinstance(self.layers, (list, tuple)) else [self.layers]
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

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        names = qualified_layer_names(model)
        self.writer = writer = RunWriter(self.save_path)
        writer.set_layers(
            [
                (
                    i,
                    names.get(id(layer), layer.name),
                    type(layer).__name__,
                    int(sum(math.prod(v.shape) for v in layer.weights)),
                    None,
                )
                for i, layer in enumerate(leaf_layers(model))
            ]
        )
        writer.set_meta("model", type(model).__name__)
        writer.set_meta("framework", "keras")
        self._tracked: list[_Tracked] = []
        seen: set[int] = set()
        for layer_id, layer in self._select(model):
            qualified = names.get(id(layer), layer.name)
            for variable in layer.trainable_weights:
                if id(variable) in seen:
                    continue
                seen.add(id(variable))
                param = f"{qualified}.{variable.name}"
                sid = writer.series_id(layer_id, param)
                self._tracked.append(_Tracked(len(self._tracked), layer_id, qualified, param, variable, sid))
        if not self._tracked:
            raise ValueError("the selected layers have no trainable variables: nothing to record")
        self._stat_ids = [writer.stat_id(s) for s in GRAD_STATS]
        self._ratio_stat = writer.stat_id("update_ratio")
        self._step = writer.next_step()
        last = writer.last_epoch()
        self._epoch0 = 0 if last is None else last + 1
        self._epoch_first_step: int | None = None
        self._acc = EpochAccumulator(len(self._tracked), len(GRAD_STATS))
        self._hist_ranges: dict[int, tuple[float, float]] = {}
        k = int(getattr(model, "steps_per_execution", 1) or 1)
        self._k = k
        self._buffer = tf.Variable(tf.fill((k, len(self._tracked), _COLUMNS), np.nan), trainable=False)
        self._losses = tf.Variable(tf.fill((k,), np.nan), trainable=False)
        self._pending_loss = tf.Variable(np.float32(np.nan), trainable=False)
        self._counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._read = 0
        self._current_epoch = 0
        writer.flush()
        self._install(model)

    def _install(self, model: Any) -> None:
        optimizer = model.optimizer
        if optimizer is None:
            raise ValueError("the model has no optimizer: compile it before fit")
        rows = {id(t.variable): t.row for t in self._tracked}
        original_apply, original_scale = optimizer.apply, optimizer.scale_loss
        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            if trainable_variables is None:  # Keras then applies to its own variable list
                trainable_variables = optimizer._trainable_variables
            grads, variables = list(grads), list(trainable_variables)
            picked = [(rows[id(v)], g, v) for g, v in zip(grads, variables, strict=True) if id(v) in rows]
            slot = self._counter % self._k
            columns = []
            if self.gradients and picked:
                stats = tf.stack([gradient_statistics(g) for _, g, _ in picked])
                if loss_scaled:
                    inv = 1.0 / tf.cast(optimizer.dynamic_scale, tf.float32)
                    stats = stats * tf.stack([inv, inv, inv, inv * inv, inv, inv])
                columns.append(stats)
            else:
                columns.append(tf.fill((len(picked), len(GRAD_STATS)), np.float32(np.nan)))
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
                index = tf.constant([[r] for r, _, _ in picked], dtype=tf.int32)
                table = tf.tensor_scatter_nd_update(table, index, tf.concat(columns, axis=1))
            self._buffer[slot].assign(table)
            self._losses[slot].assign(self._pending_loss)  # NaN when scale_loss was not called
            self._pending_loss.assign(np.float32(np.nan))
            self._counter.assign_add(1)
            return result

        def scale_loss(loss: Any) -> Any:
            self._pending_loss.assign(tf.cast(tf.reshape(loss, ()), tf.float32))
            return original_scale(loss)

        for name, fn in (("apply", apply), ("scale_loss", scale_loss)):
            # object.__setattr__: an instance attribute Keras does not track; removed on_train_end.
            object.__setattr__(optimizer, name, fn)
            self._installed.append((optimizer, name))
        model.make_train_function(force=True)  # retrace so the compiled step includes the recorder

    def _uninstall(self) -> None:
        for owner, name in reversed(self._installed):
            if name in vars(owner):
                object.__delattr__(owner, name)
        self._installed.clear()
        if self.model is not None:
            self.model.train_function = None  # the next fit compiles Keras' plain step again

    # -- per batch and per epoch --------------------------------------------------------------
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
                        for sid, v in zip(self._stat_ids, values[t.row, : len(GRAD_STATS)], strict=True)
                    ]
                if self.weights:
                    rows.append((self._step, epoch, t.series_id, self._ratio_stat, float(values[t.row, -1])))
            self.writer.add_scalars(rows)
            if self.gradients:
                self._acc.update(np.arange(len(self._tracked)), values[:, : len(GRAD_STATS)])
            if self._epoch_first_step is None:
                self._epoch_first_step = self._step
            self._step += 1
            if self._step % self.flush_every == 0:
                self.writer.flush()
        self._read = count

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

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
        self.writer.flush()
        self._acc = EpochAccumulator(len(self._tracked), len(GRAD_STATS))
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
            if t.row not in self._hist_ranges:
                self._hist_ranges[t.row] = fixed_range(w)
            lo, hi = self._hist_ranges[t.row]
            self.writer.add_histogram(
                step, epoch, t.series_id, "weight", lo, hi, histogram(w, lo, hi, self.histogram_bins)
            )
        self.writer.add_scalars(rows)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._uninstall()
        if self.writer is not None:
            self.writer.set_meta("finished", time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.writer.close()
            self.writer = None


__all__ = ["MonitorCallback", "gradient_statistics", "qualified_layer_names"]
