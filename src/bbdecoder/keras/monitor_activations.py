"""Activation statistics of Keras layers inside the compiled train function, stored like the PyTorch
:class:`~bbdecoder.monitor.activation_watch.ActivationWatcher` does (same stat names, ``param ""``,
one row per layer and epoch, ``dead_units`` events).

Each watched layer gets an :class:`ActivationProbe`: its accumulators (per-channel maximum,
saturated / total element counts, the summed channel variance, the number of forwards), updated by
the traced train step with the layer's output and created on its first trace, when the channel
count is known. Without XLA they are NumPy arrays that the fused kernel updates in one read of the
output (:class:`~bbdecoder.keras.monitor_host.HostProbe`); under XLA, or where the kernel cannot
express the layer's saturation test, ``tf.Variable`` s updated by TF ops (lifted out of the
function with ``tf.init_scope``). :meth:`ActivationRecorder.record` reads them once per epoch.
Which layers are watched: :mod:`~bbdecoder.keras.activation_kinds`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bbdecoder.keras._backend import tf
from bbdecoder.keras.activation_kinds import saturation_rules, saturation_test, watched_layers
from bbdecoder.keras.monitor_host import HostProbe, Runner, host_call
from bbdecoder.keras.monitor_tfops import when_recorded
from bbdecoder.monitor.activation_rows import ProbeEpoch, store_activation_epoch
from bbdecoder.monitor.probe_state import ACTIVATION_STATE
from bbdecoder.store.vocabulary import ACTIVATION_PARAM
from bbdecoder.store.writer import RunWriter


def _no_update() -> Any:
    """The skipped branch of a probe's ``tf.cond`` (a value of the other branch's dtype)."""
    return tf.zeros((), tf.int64)


class ActivationProbe:
    """Running activation state of one layer over the current epoch (``host``: in NumPy arrays
    updated by the fused kernel where the layer allows, else in ``tf.Variable`` s).

    - ``max``: per channel, the largest output seen; a unit is **dead** when it is ``<= threshold``
      (updated only where ``count_dead``: rectifiers and the layers the user named).
    - ``saturated`` / ``total``: element counts (only for layers with a :func:`saturation_test`).
    - ``channel_var``: population variance across channels of the channels' mean outputs (over
      samples and positions), summed over forwards; ``forwards`` counts the forwards.

    The state and its reductions are those of the PyTorch probe (``STATE``). ``aside``: the host
    state's updates run there (the host worker, where a core is spare), in a traced step; the
    state is read after the worker's ``wait``.
    """

    STATE = ACTIVATION_STATE

    def __init__(
        self,
        layer_id: int,
        name: str,
        layer: Any,
        threshold: float,
        eps: float,
        axis: int,
        *,
        count_dead: bool = True,
        host: bool = False,
        aside: Runner | None = None,
    ) -> None:
        self.layer_id = layer_id
        self.name = name
        self.threshold = threshold
        self.count_dead = count_dead
        self.axis = axis
        self.saturation = saturation_test(layer, eps)
        self.rules = saturation_rules(layer, eps) if host else None  # None: the TF ops
        self.channels: int | None = None
        self._vars: dict[str, Any] = {}
        self._host: HostProbe | None = None
        self._aside = aside  # the host probe's updates on another thread (HostProbe.soon)

    def _initial(self, channels: int) -> dict[str, Any]:
        initial = {
            "max": np.full(channels, -np.inf, dtype=np.float32),
            "saturated": np.int64(0),
            "total": np.int64(0),
            "channel_var": np.float64(0.0),
            "forwards": np.int64(0),
        }
        return {name: initial[name] for name in self.STATE}

    def _create(self, channels: int) -> None:
        with tf.init_scope():  # created eagerly, captured by the traced step
            self._vars = {
                key: tf.Variable(value, trainable=False, name=f"bbdecoder_{key}")
                for key, value in self._initial(channels).items()
            }
        self.channels = channels

    def update(self, output: Any, recorded: Any = None) -> None:
        """Add one forward's output (called while the train step is traced or run eagerly);
        ``recorded``: a boolean tensor, the output is added only when it is true (``None``: always)."""
        y = tf.cast(tf.stop_gradient(output), tf.float32)
        rank = y.shape.rank
        if rank is None or rank == 0:
            return
        axis = self.axis % rank if rank > 1 else 0  # (N,): one channel
        channels = y.shape[axis] if rank > 1 else 1
        if channels is None:
            raise ValueError(
                f"the output of layer {self.name!r} has no static size along the channel axis "
                f"{self.axis}; watch another layer or set channel_axis"
            )
        inner = y.shape[axis + 1 :].num_elements() if rank > 1 else 1
        host = self.rules is not None and inner is not None
        if self.channels is None:
            if host:
                self._host = HostProbe(int(channels), int(inner or 1), self.rules or [], self._aside)
                self.channels = int(channels)
            else:
                self._create(int(channels))
        elif channels != self.channels:
            raise ValueError(
                f"layer {self.name!r} returned {channels} channels after {self.channels}; a watched "
                "layer must keep its channel count (a shared layer called on differently shaped inputs?)"
            )
        if self._host is not None:
            if not host or self._host.inner != inner:
                raise ValueError(
                    f"layer {self.name!r} returned {y.shape} after outputs of {self._host.inner} elements "
                    "per channel after the channel axis; a watched layer must keep that size"
                )
            traced = self._host.aside is not None and not tf.executing_eagerly()
            host_call(self._host.soon if traced else self._host, [y], "bbdecoder_probe", recorded)
            return
        when_recorded(recorded, lambda: self._accumulate(y, axis, int(channels)), _no_update)

    def _accumulate(self, y: Any, axis: int, channels: int) -> Any:
        """The TF ops that add ``y`` to the ``tf.Variable`` state (returns a dummy for ``tf.cond``)."""
        rank = y.shape.rank
        last = y if axis == rank - 1 else tf.experimental.numpy.moveaxis(y, axis, -1)
        ch = tf.reshape(last, (-1, channels))  # (N,) too: one channel
        v = self._vars
        if self.count_dead:
            v["max"].assign(tf.maximum(v["max"], tf.reduce_max(ch, axis=0)))
        means = tf.reduce_mean(ch, axis=0)
        variance = tf.reduce_mean(tf.square(means - tf.reduce_mean(means)))
        v["channel_var"].assign_add(tf.cast(variance, tf.float64))
        if self.saturation is not None:
            # counted in int32 (half the bytes written of an int64 cast; exact below 2^31 elements)
            count = tf.reduce_sum(tf.cast(self.saturation(y), tf.int32))
            v["saturated"].assign_add(tf.cast(count, tf.int64))
            v["total"].assign_add(tf.size(y, out_type=tf.int64))
        return v["forwards"].assign_add(1)

    def state(self) -> list[Any]:
        """``[max (C,), saturated, total, channel_var, forwards]`` as float64 tensors (``[]``: no forward)."""
        if self._host is not None:
            return self._host.state()
        if not self._vars:
            return []
        v = self._vars
        return [tf.cast(tf.reshape(v[k], (-1,)), tf.float64) for k in v]

    def reset(self) -> None:
        if self._host is not None:
            self._host.reset()
            return
        if self.channels is None:
            return
        for key, value in self._initial(self.channels).items():
            self._vars[key].assign(value)


class ActivationRecorder:
    """The probes of the watched layers and the per-epoch rows they produce in the run store."""

    def __init__(self, writer: RunWriter) -> None:
        self.writer = writer
        self.probes: dict[int, ActivationProbe] = {}

    def watch(self, probe: ActivationProbe) -> None:
        self.probes[probe.layer_id] = probe
        self.writer.series_id(probe.layer_id, ACTIVATION_PARAM)

    def record(self, step: int, epoch: int) -> dict[int, np.ndarray]:
        """Store this epoch's statistics (one host copy for all layers), reset, and return
        ``{layer_id: dead channel indices}`` of the layers that ran."""
        states = {lid: probe.state() for lid, probe in self.probes.items()}
        parts = [t for state in states.values() for t in state]
        if not parts:
            return {}
        host = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in parts])
        epochs, pos = [], 0
        for lid, state in states.items():
            probe = self.probes[lid]
            if not state:
                continue
            c = int(probe.channels or 0)
            saturated, total, channel_var, forwards = (float(v) for v in host[pos + c : pos + c + 4])
            has_saturation = probe.saturation is not None
            epochs.append(
                ProbeEpoch(
                    lid,
                    probe.name,
                    host[pos : pos + c],
                    saturated,
                    total,
                    channel_var,
                    forwards,
                    probe.threshold,
                    count_dead=probe.count_dead,
                    has_saturation=has_saturation,
                )
            )
            pos += c + 4
            if forwards:
                probe.reset()
        return store_activation_epoch(self.writer, epochs, step, epoch)


__all__ = ["ActivationProbe", "ActivationRecorder", "watched_layers"]
