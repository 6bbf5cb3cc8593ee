"""Finding the layers of any Keras 3 model and intercepting their calls without changing the model.

Functional, Sequential and subclassed models (nested blocks and models included) all run their layers
through ``Layer.__call__``, which calls ``self.call``. :func:`intercepted_calls` shadows ``call`` on
the *instances* for the length of a ``with`` block and always removes the shadow on exit, so the model
is exactly as it was afterwards, also when the forward pass raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bbdecoder.keras._backend import keras

LayerCall = Callable[..., Any]
Interceptor = Callable[[Any, LayerCall, tuple[Any, ...], dict[str, Any]], Any]
"""``interceptor(layer, original_call, args, kwargs) -> outputs``; it must call ``original_call``."""

LayerSelector = Any
"""A ``keras.layers.Layer`` of the model, a layer's name, or an ID into :func:`leaf_layers`."""


def check_model(model: Any) -> Any:
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"expected a Keras 3 model or layer (keras.Model, keras.Sequential, a subclass), got "
            f"{type(model).__name__}; PyTorch modules go to bbdecoder's top-level explainers"
        )
    return model


def all_layers(model: Any) -> list[Any]:
    """The model itself and every layer nested in it, each once, depth first."""
    return list(check_model(model)._flatten_layers(include_self=True, recursive=True))


def leaf_layers(model: Any) -> list[Any]:
    """Layers without sub-layers (input layers excluded), depth first; their position is their ID."""
    return [
        layer
        for layer in all_layers(model)
        if not layer._flatten_layers(include_self=False, recursive=False)
        and not isinstance(layer, keras.layers.InputLayer)
    ]


def find_layer(model: Any, selector: LayerSelector) -> Any:
    """One layer of ``model`` by object, name or leaf ID; a clear error when there is not exactly one."""
    layers = all_layers(model)
    if isinstance(selector, keras.layers.Layer):
        if not any(layer is selector for layer in layers):
            raise ValueError(f"the layer {selector.name!r} is not part of the model {model.name!r}")
        return selector
    if isinstance(selector, str):
        matches = [layer for layer in layers if layer.name == selector]
        if len(matches) != 1:
            names = ", ".join(layer.name for layer in leaf_layers(model))
            raise ValueError(
                f"the layer name {selector!r} matches {len(matches)} layers of the model; it must name "
                f"exactly one. Leaf layers: {names}"
            )
        return matches[0]
    if isinstance(selector, int) and not isinstance(selector, bool):
        leaves = leaf_layers(model)
        if not -len(leaves) <= selector < len(leaves):
            raise ValueError(f"layer ID {selector} is out of range: the model has {len(leaves)} leaf layers")
        return leaves[selector]
    raise TypeError(f"select a layer by Layer object, name or leaf ID, got {type(selector).__name__}")


@contextlib.contextmanager
def intercepted_calls(layers: Iterable[Any], interceptor: Interceptor) -> Iterator[None]:
    """Route every call of each layer through ``interceptor`` inside the block; restore on exit."""
    saved: list[tuple[Any, bool, Any]] = []
    try:
        for layer in _unique(layers):
            had_own_call = "call" in vars(layer)
            original = layer.call
            saved.append((layer, had_own_call, vars(layer).get("call")))
            # object.__setattr__ bypasses Keras' attribute tracking: nothing about the layer is recorded.
            object.__setattr__(layer, "call", _routed(layer, original, interceptor))
        yield
    finally:
        for layer, had_own_call, own_call in reversed(saved):
            if had_own_call:
                object.__setattr__(layer, "call", own_call)
            else:
                object.__delattr__(layer, "call")


def _routed(layer: Any, original: LayerCall, interceptor: Interceptor) -> LayerCall:
    def call(*args: Any, **kwargs: Any) -> Any:
        return interceptor(layer, original, args, kwargs)

    return call


def _unique(layers: Iterable[Any]) -> list[Any]:
    seen: set[int] = set()
    unique = []
    for layer in layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            unique.append(layer)
    return unique


@contextlib.contextmanager
def without_activation(layer: Any) -> Iterator[Any]:
    """Inside the block the layer's fused ``activation`` is the identity; yields the real one (or None).

    Conv and Dense layers apply ``activation`` inside ``call``; FullGrad needs the pre-activation output.
    """
    activation = vars(layer).get("activation")
    linear = keras.activations.get("linear")
    if activation is None or activation is linear:
        yield None
        return
    object.__setattr__(layer, "activation", linear)
    try:
        yield activation
    finally:
        object.__setattr__(layer, "activation", activation)


__all__ = [
    "LayerSelector",
    "all_layers",
    "find_layer",
    "intercepted_calls",
    "leaf_layers",
    "without_activation",
]
