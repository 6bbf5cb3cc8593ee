"""The Keras capture of the training monitor: what the shadowed optimizer ``apply``, ``scale_loss``,
``train_step`` and layer ``call`` compute inside the compiled train step.

Each step writes, for every tracked variable, the six gradient statistics (:data:`GRAD_STATS`
order), the update ratio and a finiteness flag into one ``(k, n, 8)`` ``tf.Variable`` buffer (``k`` =
``steps_per_execution``) and the loss into a ``(k,)`` one; :meth:`StepCapture.read` copies the new
steps to the host once per executed batch for the shared
:class:`~bbdecoder.monitor.recorder.Recorder`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.monitor_host import COLUMNS, NSTATS, HostStep, host_call, spare_core
from bbdecoder.keras.monitor_patch import OWNER_ATTRIBUTE

try:  # Keras' own test for "this call only computes output shapes" (compute_output_spec)
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope
except ImportError:  # pragma: no cover - other Keras layouts

    def in_symbolic_scope() -> bool:
        return False


CONDITION = 4.0
"""The one-pass variance ``E[g^2] - mean^2`` is used where ``E[g^2] <= CONDITION * var`` (the
PyTorch monitor's rule, :data:`bbdecoder.monitor.moment_rows.CONDITION`); elsewhere the two-pass."""


def _norm(x: Any, fused: bool) -> Any:
    """``||x||``: the fused ``EuclideanNorm`` kernel (no XLA kernel: under XLA, where the square and
    the sum fuse anyway, ``sqrt(sum(x^2))``)."""
    return tf.math.reduce_euclidean_norm(x) if fused else tf.sqrt(tf.reduce_sum(tf.square(x)))


def gradient_statistics(grad: Any, fused: bool = True) -> Any:
    """The six statistics of one gradient as a float32 ``(6,)`` tensor, in :data:`GRAD_STATS` order:
    mean, mean |g|, max |g|, population variance, L1, L2.

    XLA is off on CPU, so each TF op is its own pass, and an elementwise op allocates and writes
    its output: the sum, ``|g|`` (written once, read by its sum and its max) and
    ``reduce_euclidean_norm`` (one fused pass, half the time of a square and a sum) give every
    statistic; the variance is ``E[g^2] - mean^2`` where that loses no digits (``mean^2 <= 3 var``,
    the common case: relative error at most ``3 * CONDITION`` times that of the float32 sum of
    squares), else the exact two-pass ``sum((g - mean)^2) / n`` (a ``tf.cond``: only that branch
    runs). ``fused=False`` under XLA (see :func:`_norm`)."""
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    g = grad if grad.dtype in (tf.float32, tf.float64) else tf.cast(grad, tf.float32)
    n = tf.cast(tf.size(g), g.dtype)
    mean = tf.reduce_sum(g) / n
    magnitude = tf.abs(g)
    l1 = tf.reduce_sum(magnitude)
    l2 = _norm(g, fused)
    square_mean = l2 * l2 / n
    one_pass = tf.maximum(square_mean - mean * mean, 0.0)
    var = tf.cond(
        (square_mean <= CONDITION * one_pass) | (square_mean == 0),
        lambda: one_pass,
        lambda: tf.reduce_sum(tf.math.squared_difference(g, mean)) / n,
    )
    return tf.cast(tf.stack([mean, l1 / n, tf.reduce_max(magnitude), var, l1, l2]), tf.float32)


def finite_from_statistics(stats: Any) -> Any:
    """1.0 where the gradient of a :func:`gradient_statistics` row held no NaN/Inf, read from the row
    (no pass over the gradient): a NaN makes L1 NaN, an Inf (without NaN) makes ``max |g|`` +Inf; a
    finite gradient gives neither (an L1 that overflows is Inf, not NaN; an empty one has max -Inf)."""
    bad = tf.math.is_nan(stats[4]) | (stats[2] == np.float32(np.inf))
    return tf.cast(tf.logical_not(bad), tf.float32)


def update_ratio(before: Any, after: Any, fused: bool = True) -> Any:
    """``||after - before|| / ||before||``, or ``||after - before||`` where ``||before|| = 0`` (a
    zero-initialised bias): the PyTorch monitor's rule, never ``inf``."""
    before = tf.cast(before, tf.float32)
    delta = tf.sqrt(tf.reduce_sum(tf.math.squared_difference(tf.cast(after, tf.float32), before)))
    norm = _norm(before, fused)
    return tf.where(norm > 0, delta / tf.where(norm > 0, norm, 1.0), delta)


def _host_array(x: Any) -> Any:
    """A gradient or weight as the host kernels take it: dense, float32 or float64."""
    if isinstance(x, tf.IndexedSlices):
        x = tf.convert_to_tensor(x)
    return x if x.dtype in (tf.float32, tf.float64) else tf.cast(x, tf.float32)


def _all_finite(grad: Any) -> Any:
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    return tf.cast(tf.reduce_all(tf.math.is_finite(values)), tf.float32)


def _read(variable: Any) -> np.ndarray:
    """A small variable's value on the host, by the raw read op (``numpy()`` adds ~50 us of Python)."""
    return tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype).numpy()


def first_tensor(outputs: Any) -> Any:
    """The first tensor of a layer's outputs (a tensor, a list/tuple or a dict of them), or ``None``."""
    if tf.is_tensor(outputs):
        return outputs
    if isinstance(outputs, (list, tuple)):
        return next((o for o in outputs if tf.is_tensor(o)), None)
    if isinstance(outputs, dict):
        return next((o for o in outputs.values() if tf.is_tensor(o)), None)
    return None


class StepCapture:
    """The device-side buffers of one ``fit`` and the functions that shadow Keras' methods.

    Args:
        owner: the callback (marked on every installed function, see ``monitor_patch``).
        rows: ``{id(variable): row}`` of the tracked variables.
        k: ``steps_per_execution`` (steps between two host reads).
        gradients, weights: record the statistics / the update ratios.
        xla: the train step is compiled by XLA (``jit_compile``): no ``EuclideanNorm`` kernel there.
        host: fill the tables on the host (:mod:`~bbdecoder.keras.monitor_host`; never under XLA).
    """

    def __init__(
        self,
        owner: Any,
        rows: dict[int, int],
        k: int,
        *,
        gradients: bool,
        weights: bool,
        xla: bool = False,
        host: bool = False,
    ) -> None:
        self.owner = owner
        self.fused = not xla  # the EuclideanNorm kernel has no XLA version
        self.host = None
        if host and not xla:
            self.host = HostStep(len(rows), k, gradients=gradients, weights=weights, aside=spare_core())
        self.rows = rows
        self.k = k
        self.gradients = gradients
        self.weights = weights
        n = len(rows)
        self.buffer = tf.Variable(tf.fill((k, n, COLUMNS), np.nan), trainable=False)
        self.losses = tf.Variable(tf.fill((k,), np.nan), trainable=False)
        self.pending_loss = tf.Variable(np.float32(np.nan), trainable=False)
        self.counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.read_count = 0
        self.in_step = False
        self.forward_order: list[int] = []
        self.loss_scaled = False

    def _owned(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, OWNER_ATTRIBUTE, self.owner)
        return fn

    def apply(self, optimizer: Any) -> Callable[..., Any]:
        """The shadow of ``optimizer.apply``: statistics before, update ratios after the update."""
        original_apply = optimizer.apply
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        n = len(self.rows)

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            if trainable_variables is None:  # Keras then applies to its own variable list
                trainable_variables = optimizer._trainable_variables
            grads, variables = list(grads), list(trainable_variables)
            picked = [
                (self.rows[id(v)], g, v)
                for g, v in zip(grads, variables, strict=True)
                if id(v) in self.rows and g is not None
            ]
            if self.host is not None:
                return self._apply_on_host(optimizer, original_apply, grads, variables, picked)
            slot = self.counter % self.k
            columns = []
            if self.gradients and picked:
                rows = [gradient_statistics(g, self.fused) for _, g, _ in picked]
                finite = [finite_from_statistics(r) for r in rows]
                stats = tf.stack(rows)
                if self.loss_scaled:
                    # the scale the loss was multiplied by (built lazily by the first apply, as in Keras)
                    scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
                    inv = 1.0 / tf.cast(scale, tf.float32)
                    stats = stats * tf.stack([inv, inv, inv, inv * inv, inv, inv])
                columns.append(stats)
            else:
                columns.append(tf.fill((len(picked), NSTATS), np.float32(np.nan)))
                finite = [_all_finite(g) for _, g, _ in picked]
            before = [tf.identity(v.value) for _, _, v in picked] if self.weights else []
            result = original_apply(grads, variables)
            if self.weights and picked:
                ratios = [
                    update_ratio(b, v.value, self.fused) for (_, _, v), b in zip(picked, before, strict=True)
                ]
                columns.append(tf.reshape(tf.stack(ratios), (-1, 1)))
            else:
                columns.append(tf.fill((len(picked), 1), np.float32(np.nan)))
            table = tf.fill((n, COLUMNS), np.float32(np.nan))
            if picked:
                columns.append(tf.reshape(tf.stack(finite), (-1, 1)))
                index = tf.constant([[r] for r, _, _ in picked], dtype=tf.int32)
                table = tf.tensor_scatter_nd_update(table, index, tf.concat(columns, axis=1))
            self.buffer[slot].assign(table)
            self.losses[slot].assign(self.pending_loss)  # NaN when scale_loss was not called
            self.pending_loss.assign(np.float32(np.nan))
            self.counter.assign_add(1)
            return result

        return self._owned(apply)

    def _apply_on_host(
        self,
        optimizer: Any,
        original_apply: Callable[..., Any],
        grads: list[Any],
        variables: list[Any],
        picked: list,
    ) -> Any:
        """``apply`` with the step's row written by one ``numpy_function`` after the update."""
        host = self.host
        assert host is not None
        inv = tf.constant(1.0, tf.float32)
        if self.loss_scaled and self.gradients:  # the scale of this step's gradients, read before the update
            scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
            inv = 1.0 / tf.cast(scale, tf.float32)
        loss = tf.identity(self.pending_loss)
        new = [(r, v) for r, _, v in picked if r not in host.ratios.snapshots]
        if new and self.weights:
            with tf.init_scope():  # the snapshot, taken when the step is first traced: just before it runs
                host.ratios.add({r: v.numpy() for r, v in new})
        result = original_apply(grads, variables)
        dense = [_host_array(g) for _, g, _ in picked]
        after = [_host_array(v.value) for _, _, v in picked] if self.weights else []
        record = partial(host.record, [r for r, _, _ in picked], len(dense))
        host_call(record, [loss, inv, *dense, *after], "bbdecoder_step")
        self.pending_loss.assign(np.float32(np.nan))
        return result

    def scale_loss(self, original_scale: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The shadow of ``optimizer.scale_loss``: notes the step's loss."""

        def scale_loss(loss: Any) -> Any:
            self.pending_loss.assign(tf.cast(tf.reshape(loss, ()), tf.float32))
            return original_scale(loss)

        return self._owned(scale_loss)

    def train_step(self, original_step: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Layer calls made inside this function belong to a training step (traced or eager)."""

        def train_step(data: Any) -> Any:
            self.in_step = True
            self.forward_order.clear()
            try:
                return original_step(data)
            finally:
                self.in_step = False

        return self._owned(train_step)

    def call(self, layer_id: int, original_call: Callable[..., Any], probe: Any) -> Callable[..., Any]:
        """The shadow of a layer's ``call``: notes the forward order, feeds the activation probe."""

        def call(*args: Any, **kwargs: Any) -> Any:
            outputs = original_call(*args, **kwargs)
            if not self.in_step or in_symbolic_scope():
                return outputs
            if layer_id not in self.forward_order:
                self.forward_order.append(layer_id)
            tensor = first_tensor(outputs) if probe is not None else None
            if probe is not None and tensor is not None and not isinstance(tensor, keras.KerasTensor):
                with tf.name_scope("bbdecoder_activations"):
                    probe.update(tensor)
            return outputs

        return self._owned(call)

    def guarded(
        self, compiled: Callable[[Any], Any], abort: Callable[[BaseException], None]
    ) -> Callable[[Any], Any]:
        """The train function, calling ``abort`` when a step raises (end of data excepted)."""

        def train_function(iterator: Any) -> Any:
            try:
                return compiled(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise
            except BaseException as error:
                abort(error)
                raise

        return self._owned(train_function)

    def read(self) -> list[tuple[np.ndarray, float, Callable[[], None] | None]]:
        """The steps run since the last read, in order: ``(table (n, 8) float64, loss, measure)``;
        ``measure`` (on the host path with update ratios) fills the table's ratio column, once,
        on any thread, before the next step's update is read (else ``None``: it is filled)."""
        count = self.host.count if self.host is not None else int(_read(self.counter))
        new = count - self.read_count
        if new <= 0:
            return []
        if new > self.k:
            raise RuntimeError(
                f"{new} steps ran between two callbacks, more than steps_per_execution={self.k}"
            )
        steps = range(self.read_count, count)
        self.read_count = count
        host = self.host
        if host is None:
            table, losses = _read(self.buffer).astype(np.float64), _read(self.losses).astype(np.float64)
            return [(table[i % self.k], float(losses[i % self.k]), None) for i in steps]
        out: list[tuple[np.ndarray, float, Callable[[], None] | None]] = []
        for i in steps:  # copies: the next step rewrites the rows the writer thread reads
            row = host.table[i % self.k].copy()
            measure = partial(host.measure, i, row) if i in host.after else None
            out.append((row, float(host.losses[i % self.k]), measure))
        return out
