"""Which Keras layers the activation probes treat as activation functions, and their saturation
tests: the PyTorch monitor's rules (:mod:`bbdecoder.monitor.activations`) for Keras layers.

``activations=True`` watches the layers whose output is an elementwise activation function's
(:func:`activation_kind`), dead units are counted on the rectifiers, and a layer whose activation
has a saturation test gets :func:`saturation_test` (TF ops) or :func:`saturation_rules` (the
fused kernel's comparisons)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.monitor_layers import select_leaves

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


RECTIFIER_ACTIVATIONS = frozenset(
    {"relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "mish", "hard_silu", "threshold"}
)
"""Activation functions with a "dead" regime (the PyTorch monitor's ``RECTIFIERS``)."""

ACTIVATIONS = RECTIFIER_ACTIVATIONS | {
    "hard_tanh",
    "sigmoid",
    "tanh",
    "hard_sigmoid",
    "softplus",
    "softsign",
    "log_sigmoid",
    "tanh_shrink",
    "glu",
}
"""Activation functions watched by ``activations=True`` (the PyTorch ``ACTIVATION_FUNCTIONS``:
elementwise ones; softmax, whose output is a distribution, is not)."""

_RECTIFIER_LAYERS = tuple(
    cls
    for cls in (getattr(keras.layers, name, None) for name in ("ReLU", "LeakyReLU", "PReLU", "ELU"))
    if cls
)


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


def activation_kind(layer: Any) -> str | None:
    """``"rectifier"`` for a layer whose output is a rectifier's (a ``ReLU``/``LeakyReLU``/``PReLU``/
    ``ELU`` layer, ``Activation("relu")``, ``Conv2D(activation="gelu")``, ...), ``"activation"``
    for another elementwise activation function in :data:`ACTIVATIONS`, else ``None``."""
    if isinstance(layer, _RECTIFIER_LAYERS):
        return "rectifier"
    name = activation_name(layer)
    if name in RECTIFIER_ACTIVATIONS:
        return "rectifier"
    return "activation" if name in ACTIVATIONS else None


def watched_layers(model: Any, selection: Any) -> list[tuple[int, Any, bool]]:
    """``(leaf id, layer, count dead units)`` of the layers ``activations=selection`` watches.

    ``True``: every leaf whose output is an activation function's (:func:`activation_kind`), dead
    units counted on the rectifiers - what the PyTorch ``Analyzer(activations=True)`` watches; a
    selection (IDs, names, layer objects, a list): those layers, dead units counted on each;
    ``False``/``None``: none. Warns when ``True`` finds no activation layer."""
    if selection is False or selection is None:
        return []
    if selection is not True:
        return [(i, layer, True) for i, layer in select_leaves(model, selection)]
    found = [(i, layer, activation_kind(layer)) for i, layer in select_leaves(model, None)]
    chosen = [(i, layer, kind == "rectifier") for i, layer, kind in found if kind is not None]
    if not chosen:
        warnings.warn(
            "activations=True found no activation layer (ReLU, Activation, or a Dense/Conv layer "
            "with activation=...); name the layers to watch, e.g. activations=['dense']",
            stacklevel=3,
        )
    return chosen


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


def saturation_rules(layer: Any, eps: float) -> list[tuple[str, float]] | None:
    """:func:`saturation_test` as the fused kernel's disjoint comparisons ``(op, bound)`` (``op``
    in ``lt``/``le``, at most one, and ``gt``/``ge``, at most one; the PyTorch monitor's rules), on
    every output the layer can give: a rectifier's ``y == 0`` is ``y <= 0``. ``[]`` for a layer
    without a test; ``None`` where the comparisons cannot express it (a ``ReLU`` layer with a
    negative ``threshold``, whose outputs below 0 are not saturated)."""
    if isinstance(layer, keras.layers.ReLU):
        lower = float(layer.negative_slope) == 0.0
        if lower and float(layer.threshold) < 0:
            return None
        rules = [("le", 0.0)] if lower else []
        return rules + ([("ge", float(layer.max_value))] if layer.max_value is not None else [])
    by_name = {
        "sigmoid": [("lt", eps), ("gt", 1 - eps)],
        "tanh": [("gt", 1 - eps), ("lt", -(1 - eps))],
        "relu": [("le", 0.0)],
        "relu6": [("le", 0.0), ("ge", 6.0)],
        "hard_tanh": [("le", -1.0), ("ge", 1.0)],
        "hard_sigmoid": [("le", 0.0), ("ge", 1.0)],
    }
    name = activation_name(layer)
    return by_name.get(name, []) if name is not None else []


__all__ = [
    "ACTIVATIONS",
    "RECTIFIER_ACTIVATIONS",
    "activation_kind",
    "activation_name",
    "saturation_rules",
    "saturation_test",
    "watched_layers",
]
