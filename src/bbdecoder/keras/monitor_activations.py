"""Activation statistics of Keras layers inside the compiled train function, stored like the PyTorch
:class:`~bbdecoder.monitor.activation_watch.ActivationWatcher` does (same stat names, ``param ""``,
one row per layer and epoch, ``dead_units`` events).

Each watched layer gets an :class:`ActivationProbe`: a few ``tf.Variable`` accumulators (per-channel
maximum, saturated / total element counts, the summed channel variance, the number of forwards)
that the traced train step updates with the layer's output. They are created on the first trace
(lifted out of the function with ``tf.init_scope``, when the channel count is known) and read with
one host copy per epoch by :meth:`ActivationRecorder.record`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from bbdecoder.keras._backend import keras, tf
from bbdecoder.monitor.activation_rows import ProbeEpoch, store_activation_epoch
from bbdecoder.monitor.probe_state import ACTIVATION_STATE
from bbdecoder.store.vocabulary import ACTIVATION_PARAM
from bbdecoder.store.writer import RunWriter

SaturationTest = Callable[[Any], Any]

_FUSING_LAYERS = tuple(
    cls
    for cls in (
        getattr(keras.layers, name, None)
        for name in (
            "Activation",
            "Dense",
            "EinsumDense",
            "Conv1D",
            "Conv2D",
            "Conv3D",
            "Conv1DTranspose",
            "Conv2DTranspose",
            "Conv3DTranspose",
            "SeparableConv1D",
            "SeparableConv2D",
            "DepthwiseConv1D",
            "DepthwiseConv2D",
        )
    )
    if cls is not None
)
"""Layers whose output is ``activation(...)`` of everything else they compute (RNNs are not)."""


def _bounds(lo: float, hi: float) -> SaturationTest:
    return lambda y: (y <= lo) | (y >= hi)


def activation_name(layer: Any) -> str | None:
    """The name of the activation function whose output ``layer`` returns (``Activation`` layers
    and the fused ``activation=`` of Dense/Conv layers), or ``None``."""
    if not isinstance(layer, _FUSING_LAYERS):
        return None
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None)
    return None if name in (None, "linear") else str(name)


def saturation_test(layer: Any, eps: float) -> SaturationTest | None:
    """The boolean test "this output is saturated" for the layer's activation, or ``None``.

    Sigmoid: ``y < eps`` or ``y > 1 - eps``; tanh: ``|y| > 1 - eps``; ReLU: ``y == 0``; relu6,
    hard_tanh, hard_sigmoid: at either bound - the tests of the PyTorch monitor. A ``ReLU`` layer
    is tested for ``y == 0`` (when ``negative_slope == 0``) and for ``y >= max_value`` (when set).
    """
    if isinstance(layer, keras.layers.ReLU):
        lower = float(layer.negative_slope) == 0.0
        upper = layer.max_value
        if lower and upper is not None:
            return lambda y: (y == 0) | (y >= float(upper))
        if lower:
            return lambda y: y == 0
        if upper is not None:
            return lambda y: y >= float(upper)
        return None
    tests: dict[str, SaturationTest] = {
        "sigmoid": lambda y: (y < eps) | (y > 1 - eps),
        "tanh": lambda y: tf.abs(y) > 1 - eps,
        "relu": lambda y: tf.equal(y, 0),
        "relu6": _bounds(0.0, 6.0),
        "hard_tanh": _bounds(-1.0, 1.0),
        "hard_sigmoid": _bounds(0.0, 1.0),
    }
    name = activation_name(layer)
    return tests.get(name) if name is not None else None


class ActivationProbe:
    """Running activation state of one layer over the current epoch, in ``tf.Variable`` s.

    - ``max``: per channel, the largest output seen; a unit is **dead** when it is ``<= threshold``.
    - ``saturated`` / ``total``: element counts (only for layers with a :func:`saturation_test`).
    - ``channel_var``: population variance across channels of the channels' mean outputs (over
      samples and positions), summed over forwards; ``forwards`` counts the forwards.

    The state and its reductions are those of the PyTorch probe (``STATE``).
    """

    STATE = ACTIVATION_STATE

    def __init__(self, layer_id: int, name: str, layer: Any, threshold: float, eps: float, axis: int) -> None:
        self.layer_id = layer_id
        self.name = name
        self.threshold = threshold
        self.axis = axis
        self.saturation = saturation_test(layer, eps)
        self.channels: int | None = None
        self._vars: dict[str, Any] = {}

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

    def update(self, output: Any) -> None:
        """Add one forward's output (called while the train step is traced or run eagerly)."""
        y = tf.cast(tf.stop_gradient(output), tf.float32)
        rank = y.shape.rank
        if rank is None or rank == 0:
            return
        if rank == 1:  # (N,): one channel
            channels = 1
            ch = tf.reshape(y, (-1, 1))
        else:
            axis = self.axis % rank
            channels = y.shape[axis]
            if channels is None:
                raise ValueError(
                    f"the output of layer {self.name!r} has no static size along the channel axis "
                    f"{self.axis}; watch another layer or set channel_axis"
                )
            ch = tf.reshape(tf.experimental.numpy.moveaxis(y, axis, -1), (-1, channels))
        if self.channels is None:
            self._create(int(channels))
        elif channels != self.channels:
            raise ValueError(
                f"layer {self.name!r} returned {channels} channels after {self.channels}; a watched "
                "layer must keep its channel count (a shared layer called on differently shaped inputs?)"
            )
        v = self._vars
        v["max"].assign(tf.maximum(v["max"], tf.reduce_max(ch, axis=0)))
        means = tf.reduce_mean(ch, axis=0)
        variance = tf.reduce_mean(tf.square(means - tf.reduce_mean(means)))
        v["channel_var"].assign_add(tf.cast(variance, tf.float64))
        v["forwards"].assign_add(1)
        if self.saturation is not None:
            # counted in int32 (half the bytes written of an int64 cast; exact below 2^31 elements)
            count = tf.reduce_sum(tf.cast(self.saturation(y), tf.int32))
            v["saturated"].assign_add(tf.cast(count, tf.int64))
            v["total"].assign_add(tf.size(y, out_type=tf.int64))

    def state(self) -> list[Any]:
        """``[max (C,), saturated, total, channel_var, forwards]`` as float64 tensors (``[]``: no forward)."""
        if not self._vars:
            return []
        v = self._vars
        return [tf.cast(tf.reshape(v[k], (-1,)), tf.float64) for k in v]

    def reset(self) -> None:
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
        host = tf.concat(parts, axis=0).numpy()
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
                    count_dead=True,
                    has_saturation=has_saturation,
                )
            )
            pos += c + 4
            if forwards:
                probe.reset()
        return store_activation_epoch(self.writer, epochs, step, epoch)


__all__ = ["ActivationProbe", "ActivationRecorder", "activation_name", "saturation_test"]
