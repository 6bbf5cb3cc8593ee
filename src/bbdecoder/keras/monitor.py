"""The training monitor for Keras 3 (TensorFlow backend): the same statistics, in the same run store,
as the PyTorch :class:`~bbdecoder.monitor.Analyzer`, so ``open_run`` and the figures work unchanged.

Callbacks never see gradients or layer outputs. For the length of ``fit``, :class:`MonitorCallback`
therefore shadows (instance attributes only, removed afterwards) the optimizer's ``apply`` (which
Keras' own ``train_step`` reaches through ``apply_gradients``, as do custom ``train_step`` methods
that call ``optimizer.apply``/``apply_gradients``), ``model.train_step`` (to know when a forward
belongs to a training step) and the ``call`` of the tracked and watched layers, then retraces the
train function. Each step records the six gradient statistics, the update ratio and a finiteness
flag of every tracked variable (by the fused CPU kernels on the host, called from the compiled
step, or by TF ops inside it under XLA: :mod:`bbdecoder.keras.monitor_capture`), and watched
layers update their activation accumulators (read once per epoch). What a step, an epoch and a weight
snapshot become in the store is the PyTorch monitor's own
:class:`~bbdecoder.monitor.recorder.Recorder`. The model's own ``train_step`` runs unchanged:
loss scaling, sample weights and metrics are Keras', and the weights are bit-identical to a run
without the callback.

Names (columns of ``open_run(path).scalars()``):

- ``layer_id``: the layer's position in :func:`bbdecoder.keras.layers.leaf_layers` (layers without
  sub-layers, depth first, input layers excluded) - the IDs the Keras explainers use.
- ``layer``: the layer's qualified name, the names of the nested layers from the model (excluded)
  down, joined by ``.`` (``dense_1``, ``block.conv``).
- ``param``: ``<layer>.<variable name>`` (``dense_1.kernel``, ``block.conv.bias``), the Keras
  counterpart of a PyTorch ``state_dict`` name; ``""`` for a layer's output (activation statistics).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bbdecoder.keras._backend import keras
from bbdecoder.keras.host_worker import HostWorker
from bbdecoder.keras.layers import leaf_layers
from bbdecoder.keras.monitor_activations import ActivationProbe, ActivationRecorder, watched_layers
from bbdecoder.keras.monitor_capture import StepCapture, record_step
from bbdecoder.keras.monitor_host import FINITE, NSTATS, RATIO, host_kernels, one_replica, spare_core
from bbdecoder.keras.monitor_layers import qualified_layer_names, tracked_variables
from bbdecoder.keras.monitor_patch import OWNER_ATTRIBUTE, Shadows, closing_on_error, installed_by
from bbdecoder.keras.monitor_tfops import gradient_statistics
from bbdecoder.monitor.recorder import Recorder, Series, note_progress
from bbdecoder.monitor.weights import QUANTILES
from bbdecoder.store import vocabulary as V
from bbdecoder.store.background import ThreadedRunWriter


class MonitorCallback(keras.callbacks.Callback):
    """Record gradient statistics, update ratios, weight histograms and (opt-in) activation
    statistics of a Keras model during ``fit``.

    Per step (each tracked trainable variable): ``mean``, ``mean_abs``, ``max_abs``, ``var``,
    ``l1``, ``l2`` of its gradient (as applied; with a ``LossScaleOptimizer`` the unscaled one)
    and ``update_ratio`` = ||W_after - W_before|| / ||W_before|| of that step (||W_after - W_before||
    where ||W_before|| = 0, as in PyTorch); the step's loss (the
    loss Keras' ``train_step`` passed to ``optimizer.scale_loss``; NaN for a custom ``train_step``
    that does not). Per epoch: the mean and variance of each gradient statistic across the epoch's
    steps, and weight histograms on fixed bins, ``weight_mean``, ``weight_std``, ``weight_l2`` and
    quantiles, computed by the same functions as the PyTorch monitor.

    Activations (``activations=True``: every leaf layer whose output is an elementwise activation
    function's - ``ReLU``/``LeakyReLU``/``PReLU``/``ELU`` and ``Activation`` layers, the fused
    ``activation=`` of Dense/Conv layers, softmax excluded - as the PyTorch ``Analyzer`` watches its
    activation modules; or a selection of leaf layers), per epoch, stored under ``param ""``
    exactly as the PyTorch ``Analyzer`` stores them: ``dead_fraction`` and ``dead_count`` (on the
    rectifiers, and on every layer of a selection: a channel is dead when the layer's output was
    ``<= dead_threshold`` for every sample and position of the epoch's training steps; channels
    along ``channel_axis``, the last by default), ``saturated_fraction`` (layers whose output is a
    sigmoid, tanh, ReLU, relu6, hard_sigmoid or hard_tanh; NaN otherwise) and ``channel_var``
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

    ``every=k`` records only the steps whose number is a multiple of ``k`` (as the PyTorch
    ``Analyzer``'s ``every``): their gradient statistics, loss, finiteness check and the update
    ratio of their own update; the steps in between compute nothing but the weight snapshot the
    next recorded ratio compares against (on the step just before it). The activation probes see
    the forwards of the recorded steps only (a ``tf.cond`` skips the others), as in PyTorch; the
    per-epoch weight statistics still see every epoch.

    Args:
        save_path: folder of the run store (created; an existing store is appended to).
        layers: leaf layers whose variables are tracked: IDs, names, layer objects, or a list of
            these (``None``: all).
        gradients: record the per-step gradient statistics.
        weights: record update ratios and the per-epoch weight statistics and histograms.
        activations: leaf layers whose outputs are watched: ``True`` (the activation layers, see
            above), ``False``/``None`` (none), or IDs, names, layer objects or a list of these.
        dead_threshold, saturation_eps: the activation settings of the PyTorch monitor.
        channel_axis: the channel axis of watched outputs (channels last: ``-1``).
        histogram_bins, quantiles, flush_every, every: as for the PyTorch ``Analyzer``
            (``flush_every`` counts recorded steps).
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
        every: int = 1,
    ) -> None:
        super().__init__()
        if not (gradients or weights or activations not in (False, None)):
            raise ValueError("nothing to record: set gradients=True, weights=True or activations=...")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1 (record every k-th step), got {every!r}")
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
        self.every = every
        self.writer: ThreadedRunWriter | None = None
        self.dead_units: dict[str, list[int]] = {}
        """``{layer name: dead channel indices}`` of the last recorded epoch (watched layers)."""
        self._shadows = Shadows()
        self._installed_on: Any = None
        self._capture: StepCapture | None = None
        self._worker = HostWorker()  # the host passes that leave the step

    # -- lifetime -----------------------------------------------------------------------------
    def __enter__(self) -> MonitorCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the model and optimizer and close the store (idempotent; called by ``fit``'s end)."""
        self._restore()
        if self.writer is not None:
            self._note_progress(None)
            self.writer.set_meta(V.META_FINISHED, time.strftime("%Y-%m-%dT%H:%M:%S"))
            self.writer.close()
            self.writer = None

    def _abort(self, error: BaseException) -> None:
        self._restore()
        if self.writer is not None:
            try:
                self.writer.set_meta(V.META_ABORTED, f"{type(error).__name__}: {error}"[:500])
                self.writer.close()
            finally:
                self.writer = None

    def _restore(self) -> None:
        self._shadows.restore()
        self._worker.close()
        if self._capture is not None:
            self._capture.in_step = False
        model, self._installed_on = self._installed_on, None
        if model is not None and getattr(model.train_function, OWNER_ATTRIBUTE, None) is self:
            model.train_function = None  # the next fit compiles Keras' plain step again

    # -- set-up -------------------------------------------------------------------------------
    @closing_on_error
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
        self.writer = writer = ThreadedRunWriter(self.save_path)
        leaves = leaf_layers(model)
        layer_rows: list[tuple[int, str, str, int, str | None]] = [
            (i, str(names.get(id(L), L.name)), type(L).__name__, _size(L), None) for i, L in enumerate(leaves)
        ]
        writer.set_layers(layer_rows)
        writer.set_meta(V.META_MODEL, type(model).__name__)
        writer.set_meta(V.META_FRAMEWORK, "keras")
        writer.set_meta(V.META_EVERY, str(self.every))
        self._tracked = tracked_variables(model, self.layers, names, writer)
        if not self._tracked and (self.gradients or self.weights):
            raise ValueError("the selected layers have no trainable variables: nothing to record")
        self._activations = ActivationRecorder(writer)
        xla = bool(getattr(model, "jit_compile", False))
        host = not xla and host_kernels() and one_replica(model)  # the passes of monitor_host
        settings = (self.dead_threshold, self.saturation_eps, self.channel_axis)
        worker = self._worker
        aside = worker.run_soon if spare_core() else None  # the probes' updates on the spare core
        for layer_id, layer, dead in watched_layers(model, self.activations):
            name = names.get(id(layer), layer.name)
            probe = ActivationProbe(layer_id, name, layer, *settings, count_dead=dead, host=host, aside=aside)
            self._activations.watch(probe)
        self._step = writer.next_step()
        last = writer.last_epoch()
        self._epoch0 = 0 if last is None else last + 1
        self._epoch_steps = 0  # steps run in the open epoch, recorded or not
        self._recorded = 0
        self.dead_units = {}
        k = int(getattr(model, "steps_per_execution", 1) or 1)
        rows = {id(t.variable): t.row for t in self._tracked}
        flags = {"gradients": self.gradients, "weights": self.weights, "xla": xla, "host": host}
        self._capture = StepCapture(
            self, rows, k, every=self.every, first=self._step, beside=worker.submit, **flags
        )
        self._current_epoch = 0
        self._install(model, leaves)
        bins, scaled = self.histogram_bins, self._capture.loss_scaled
        self._recorder = Recorder(
            writer, self._tracked, histogram_bins=bins, quantiles=self.quantiles, loss_scaled=scaled
        )
        writer.flush()

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
        capture = self._capture
        assert capture is not None
        self._installed_on = model
        shadow = self._shadows
        shadow.set(optimizer, "apply", capture.apply(optimizer))
        shadow.set(optimizer, "scale_loss", capture.scale_loss(optimizer.scale_loss))
        shadow.set(model, "train_step", capture.train_step(model.train_step))
        probes = self._activations.probes
        for layer_id in sorted({t.layer_id for t in self._tracked} | set(probes)):
            layer = leaves[layer_id]
            shadow.set(layer, "call", capture.call(layer_id, layer.call, probes.get(layer_id)))
        model.make_train_function(force=True)  # retrace so the compiled step includes the recorder
        model.train_function = capture.guarded(model.train_function, self._abort)

    # -- per batch and per epoch --------------------------------------------------------------
    @closing_on_error
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.writer is not None and self._capture is not None
        epoch = self._epoch0 + self._current_epoch
        rows = np.arange(len(self._tracked))
        for captured in self._capture.read():
            self._epoch_steps += 1
            self._step += 1
            if captured is None:  # a step that every= skips
                continue
            step, (table, loss, measure) = self._step - 1, captured
            finite = table[:, FINITE] != 0
            record = partial(
                record_step, self._recorder, step, epoch, rows,
                table[:, :NSTATS] if self.gradients else None, loss if np.isfinite(loss) else None,
                finite, table[:, RATIO] if self.weights else None, measure,
            )  # fmt: skip
            self._recorded += 1
            flush = self._recorded % self.flush_every == 0
            if finite.all():  # on the writer thread, overlapping the next batches
                self.writer.run_then_flush(record, flush)
            else:  # here, so that its warning comes from this batch
                self.writer.wait()
                record(first_bad=self._first_in_backward_order)
                if flush:
                    self.writer.flush()

    def _note_progress(self, ended_epoch: int | None) -> None:
        ran = self._capture is not None and self._capture.read_count > 0
        note_progress(self.writer, self._step if ran else None, ended_epoch)

    def _first_in_backward_order(self, bad: list[Series]) -> Series:
        """Backward order is the reverse of the forward: the affected layer called last comes first."""
        assert self._capture is not None
        position = {layer_id: i for i, layer_id in enumerate(self._capture.forward_order)}
        first_layer = max(bad, key=lambda t: (position.get(t.layer_id, -1), t.layer_id)).layer_id
        return next(t for t in bad if t.layer_id == first_layer)

    @closing_on_error
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    @closing_on_error
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.writer is not None
        if not self._epoch_steps:
            return
        stored_epoch, last = self._epoch0 + epoch, self._step - 1
        self.writer.wait()  # the batches' jobs: the epoch aggregates are complete
        self._worker.wait()  # the probes' updates
        if self.gradients:
            self._recorder.end_epoch(stored_epoch)
        if self.weights:
            tensors = [torch.from_numpy(np.asarray(t.variable.numpy())) for t in self._tracked]
            self._recorder.weights(last, stored_epoch, [t.row for t in self._tracked], tensors)
        dead = self._activations.record(last, stored_epoch)
        self.dead_units = {self._activations.probes[lid].name: units.tolist() for lid, units in dead.items()}
        self._note_progress(stored_epoch)
        self.writer.flush()
        self._epoch_steps = 0

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.close()


def _size(layer: Any) -> int:
    return int(sum(math.prod(v.shape) for v in layer.weights))


__all__ = ["MonitorCallback", "gradient_statistics", "qualified_layer_names"]
