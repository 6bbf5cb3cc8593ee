"""The Keras capture of the training monitor: what the shadowed optimizer ``apply``, ``scale_loss``,
``train_step`` and layer ``call`` compute inside the compiled train step.

Each recorded step writes, for every tracked variable, the six gradient statistics
(:data:`GRAD_STATS` order), the update ratio and a finiteness flag into a ``(k, n, 8)`` table (``k``
= ``steps_per_execution``) and the loss into a ``(k,)`` one: NumPy arrays filled by the fused kernels
on the host (:mod:`~bbdecoder.keras.monitor_host`), or ``tf.Variable`` buffers filled by TF ops
(:mod:`~bbdecoder.keras.monitor_tfops`). :meth:`StepCapture.read` hands the new steps to the
shared :class:`~bbdecoder.monitor.recorder.Recorder` once per executed batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.monitor_host import COLUMNS, HostStep, Submit, host_call, spare_core, usable_cpus
from bbdecoder.keras.monitor_patch import OWNER_ATTRIBUTE
from bbdecoder.keras.monitor_tfops import dense_float, step_table
from bbdecoder.monitor.recorder import Recorder, Series

try:  # Keras' own test for "this call only computes output shapes" (compute_output_spec)
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope
except ImportError:  # pragma: no cover - other Keras layouts

    def in_symbolic_scope() -> bool:
        return False


def pair_passes() -> bool:
    """The host's two passes of a step can run side by side: two or more CPUs."""
    return usable_cpus() >= 2


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


CapturedStep = tuple[np.ndarray, float, Callable[[], None] | None]
"""One recorded step as :meth:`StepCapture.read` hands it out: ``(table, loss, measure)``."""


class StepCapture:
    """The device-side buffers of one ``fit`` and the functions that shadow Keras' methods.

    Args:
        owner: the callback (marked on every installed function, see ``monitor_patch``).
        rows: ``{id(variable): row}`` of the tracked variables.
        k: ``steps_per_execution`` (steps between two host reads).
        gradients, weights: record the statistics / the update ratios.
        xla: the train step is compiled by XLA (``jit_compile``): no ``EuclideanNorm`` kernel there.
        host: fill the tables on the host (:mod:`~bbdecoder.keras.monitor_host`; never under XLA).
        every, first: record only the steps numbered ``first + i`` (``i``: the step's index in this
            ``fit``) that are multiples of ``every``; the others compute nothing (on the TF-op path
            a ``tf.cond`` skips them).
        beside: the host's ratio pass runs there during the statistics where no core is spare, on
            two or more CPUs (:func:`pair_passes`; see :class:`HostStep`).
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
        every: int = 1,
        first: int = 0,
        beside: Submit | None = None,
    ) -> None:
        self.owner = owner
        self.fused = not xla  # the EuclideanNorm kernel has no XLA version
        self.host = None
        self.every, self.first = every, first
        if host and not xla:
            self.host = HostStep(
                len(rows), k, gradients=gradients, weights=weights, aside=spare_core(),
                beside=beside if pair_passes() else None, every=every, first=first,
            )  # fmt: skip
        self.rows = rows
        self.k = k
        self.gradients = gradients
        self.weights = weights
        n = len(rows)
        self.pending_loss = tf.Variable(np.float32(np.nan), trainable=False)
        if self.host is None or every > 1:  # the steps run (the host then skips some)
            self.counter = tf.Variable(0, dtype=tf.int64, trainable=False)
        if self.host is None:  # the TF-op path's device buffers
            self.buffer = tf.Variable(tf.fill((k, n, COLUMNS), np.nan), trainable=False)
            self.losses = tf.Variable(tf.fill((k,), np.nan), trainable=False)
        self.read_count = 0
        self.in_step = False
        self.forward_order: list[int] = []
        self.loss_scaled = False

    def _recorded_now(self) -> Any:
        """Whether the running step is one ``every`` records: a boolean tensor, or ``None`` when
        every step is (a Python ``None``: no ``tf.cond`` in the graph)."""
        if self.every == 1:
            return None
        return tf.equal((self.counter + self.first) % self.every, 0)

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
            recorded = self._recorded_now()
            inv_scale = None
            if self.loss_scaled:
                # the scale the loss was multiplied by (built lazily by the first apply, as in Keras)
                def inv_scale() -> Any:
                    scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
                    return 1.0 / tf.cast(scale, tf.float32)

            flags = {"gradients": self.gradients, "weights": self.weights, "fused": self.fused}
            update = partial(original_apply, grads, variables)
            table, result = step_table(picked, n, update, inv_scale=inv_scale, recorded=recorded, **flags)
            slot = self.counter % self.k
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
        dense = [dense_float(g) for _, g, _ in picked]
        after = [dense_float(v.value) for _, _, v in picked] if self.weights else []
        rows = [r for r, _, _ in picked]
        inputs = [loss, inv, *dense, *after]
        if self.every == 1:
            host_call(partial(host.record, rows, len(dense)), inputs, "bbdecoder_step")
        else:  # the host is called on the recorded steps and the snapshot steps before them only
            position = (self.counter + self.first) % self.every
            active = tf.equal(position, 0) | tf.equal(position, self.every - 1)
            record = partial(host.record_at, rows, len(dense))
            host_call(record, [self.counter, *inputs], "bbdecoder_step", active)
            self.counter.assign_add(1)
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
                    probe.update(tensor, self._recorded_now())
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

    def read(self) -> list[CapturedStep | None]:
        """The steps run since the last read, in order: ``None`` for a step ``every`` skips, else
        ``(table (n, 8) float64, loss, measure)``; ``measure`` (on the host path with update ratios)
        fills the table's ratio column, once, on any thread, before the next step's update is read
        (else ``None``: it is filled)."""
        count = self.host.count if self.host is not None and self.every == 1 else int(_read(self.counter))
        new = count - self.read_count
        if new <= 0:
            return []
        if new > self.k:
            raise RuntimeError(
                f"{new} steps ran between two callbacks, more than steps_per_execution={self.k}"
            )
        steps = [i if (self.first + i) % self.every == 0 else None for i in range(self.read_count, count)]
        self.read_count = count
        host = self.host
        if host is None:
            table, losses = _read(self.buffer).astype(np.float64), _read(self.losses).astype(np.float64)
            return [
                None if i is None else (table[i % self.k], float(losses[i % self.k]), None) for i in steps
            ]
        out: list[CapturedStep | None] = []
        for i in steps:  # copies: the next step rewrites the rows the writer thread reads
            if i is None:
                out.append(None)
                continue
            row = host.table[i % self.k].copy()
            measure = partial(host.measure, i, row) if i in host.after else None
            out.append((row, float(host.losses[i % self.k]), measure))
        return out


def record_step(
    recorder: Recorder, step: int, epoch: int, rows: np.ndarray, values: np.ndarray | None,
    loss: float | None, finite: np.ndarray, ratios: np.ndarray | None, measure: Callable[[], None] | None,
    first_bad: Callable[[list[Series]], Series] = lambda bad: bad[0],
) -> None:  # fmt: skip
    """One batch into the recorder: its statistics, loss and update ratios (``None``: not recorded;
    ``measure``: the ratio pass that fills ``ratios`` first, see ``StepCapture.read``)."""
    if measure is not None:
        measure()
    recorder.step(step, epoch, rows, values, loss, first_bad=first_bad, finite=finite)
    if ratios is not None:
        recorder.ratios(step, epoch, rows, ratios)
