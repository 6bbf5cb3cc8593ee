"""The Keras 3 layer backend: layer calls intercepted for one forward pass, gradients from a GradientTape.

Functional, Sequential and subclassed models (nested blocks and models included) run their layers
through ``Layer.__call__``, which calls ``self.call``; :func:`bbdecoder.keras.layers.intercepted_calls`
shadows ``call`` on the chosen *instances* for one pass and always removes the shadow, so the model is
exactly as it was afterwards, also when a pass raises. The model runs with ``training=False``
(BatchNormalization's moving statistics, no dropout).

Tensors cross the boundary as NumPy copies: inputs ``(N, *spatial, C)`` become channel-first torch
tensors for the shared code, layer outputs and gradients are handed over in the layer's own layout
(channels last), and maps go back as tf.Tensors ``(N, *spatial, 1)``.

Bias layers (Conv*, Dense, BatchNormalization; see :data:`BIAS_LAYER_TYPES`) are read where the
bias is added: a fused ``activation=`` is switched off for the call and applied to the recorded
pre-activation output; a subclass with its own ``call`` (a BatchNormalization that also applies its
activation, timm's ``BatchNormAct2d`` pattern) is read inside, at the output of the stock Keras
class's ``call`` that its own ``call`` reaches through ``super().call``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from bbdecoder.attribution.bias_layers import UnreachableBiasError
from bbdecoder.backends.base import channels_first
from bbdecoder.backends.layers_base import BiasHandler, LayerCapture, LayerRef, Replacement
from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.layers import (
    LayerCall,
    all_layers,
    check_model,
    intercepted_calls,
    leaf_layers,
    without_activation,
)
from bbdecoder.keras.targets import fixed_target, is_callable_target
from bbdecoder.targets import TargetLike, target_rows

_CONV_TYPES: tuple[type, ...] = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    )
    if hasattr(keras.layers, name)
)  # fmt: skip
BIAS_LAYER_TYPES: tuple[type, ...] = (*_CONV_TYPES, keras.layers.Dense, keras.layers.BatchNormalization)
"""Conv (1/2/3-D, transposed, depthwise, separable), Dense and BatchNormalization, by ``isinstance``."""


def is_keras_model(model: Any) -> bool:
    """Whether ``model`` is a Keras 3 layer or model."""
    return isinstance(model, keras.layers.Layer)


# -- tensors across the boundary -------------------------------------------------------------------
def to_torch(value: Any) -> torch.Tensor:
    """A tf.Tensor (or array) as a torch tensor (a copy), same layout and dtype."""
    array = value.numpy() if isinstance(value, tf.Tensor) else np.asarray(value)
    return torch.from_numpy(np.array(array, copy=True))


def to_tf(value: torch.Tensor) -> Any:
    """A torch tensor as a tf.Tensor, same layout and dtype."""
    return tf.convert_to_tensor(value.detach().cpu().numpy())


# -- bias layers -----------------------------------------------------------------------------------
def is_bias_layer(layer: Any) -> bool:
    return isinstance(layer, BIAS_LAYER_TYPES)


def channel_axis(layer: Any, rank: int) -> int:
    """The (non-negative) axis of an output of ``rank`` dims that the layer's bias runs along."""
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = int(layer.axis)
    elif isinstance(layer, _CONV_TYPES) and getattr(layer, "data_format", None) == "channels_first":
        axis = 1
    else:
        axis = -1
    return axis % rank


def effective_bias(layer: Any, dtype: Any) -> Any:
    """The constant the layer adds per channel (1-D tf.Tensor in ``dtype``), or ``None`` if it adds none.

    BatchNormalization in inference mode is ``gamma * (x - mean) / sqrt(var + eps) + beta``, whose
    constant is ``beta - mean * gamma / sqrt(var + eps)`` (``gamma`` = 1 without ``scale``, ``beta`` = 0
    without ``center``). Read at every call, never cached: weights change while training.
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        mean = tf.cast(layer.moving_mean, dtype)
        scale = tf.math.rsqrt(tf.cast(layer.moving_variance, dtype) + tf.cast(layer.epsilon, dtype))
        if layer.scale:
            scale = scale * tf.cast(layer.gamma, dtype)
        bias = -mean * scale
        if layer.center:
            bias = bias + tf.cast(layer.beta, dtype)
        return tf.stop_gradient(bias)
    own_bias = getattr(layer, "bias", None)
    if own_bias is None:
        return None
    return tf.stop_gradient(tf.cast(own_bias, dtype))


def stock_class(layer: Any) -> type | None:
    """The Keras class whose ``call`` adds ``layer``'s bias when the layer's own class overrides
    ``call`` (a user subclass); ``None`` when the layer's ``call`` is Keras' own."""
    for cls in type(layer).__mro__:
        if "call" in vars(cls):
            if cls.__module__.startswith("keras."):
                return None
            break
    for cls in type(layer).__mro__:
        if "call" in vars(cls) and cls.__module__.startswith("keras.") and issubclass(cls, BIAS_LAYER_TYPES):
            return cls
    return None


class KerasUnreachableBiasError(UnreachableBiasError):
    """A Keras bias layer with its own ``call`` that never reaches the stock Keras ``call``."""

    def __init__(self, name: str, layer: Any) -> None:
        ValueError.__init__(
            self,
            f"FullGrad cannot find where the bias of layer {name!r} ({type(layer).__name__}) is added: its "
            "class overrides call() (its output may already be activated) and never calls the Keras "
            "layer's own call() (super().call), so the bias gradient would be taken at the wrong tensor. "
            "Split it into the plain Keras layer followed by its activation (identical outputs), or use "
            "SimpleFullGrad.",
        )
        self.layer = name


_STOCK_LOCK = threading.RLock()  # held for the pass: one wrapped class call at a time


@contextlib.contextmanager
def stock_calls_captured(layers: Sequence[Any], on_output: Callable[[Any, Any], Any]) -> Iterator[None]:
    """Inside the block, the stock ``call`` of each layer's :func:`stock_class` hands its output to
    ``on_output(layer, output)`` (the fused ``activation`` switched off around it and applied to what
    ``on_output`` returns), for these layer instances only; restored on exit, also on errors.

    This wraps a *Keras* class's ``call`` for one pass, never the user's model or classes; other
    instances of that class go through the original ``call`` unchanged.
    """
    watched = {id(layer) for layer in layers}
    classes = {cls for cls in (stock_class(layer) for layer in layers) if cls is not None}
    saved: list[tuple[type, Any]] = []
    with _STOCK_LOCK:
        try:
            for cls in classes:
                original = vars(cls)["call"]
                saved.append((cls, original))

                def call(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
                    if id(self) not in watched:
                        return __original(self, *args, **kwargs)
                    with without_activation(self) as activation:
                        output = __original(self, *args, **kwargs)
                    output = on_output(self, output)
                    return activation(output) if activation is not None else output

                type.__setattr__(cls, "call", call)
            yield
        finally:
            for cls, original in reversed(saved):
                type.__setattr__(cls, "call", original)


# -- the backend -----------------------------------------------------------------------------------
class KerasLayers:
    """The :class:`~bbdecoder.backends.layers_base.LayerBackend` of a Keras explainer.

    ``explainer`` provides ``model`` and ``input_transform`` (a function on channels-last tf inputs).
    """

    framework = "keras"

    def __init__(self, explainer: Any) -> None:
        self.explainer = explainer
        check_model(explainer.model)

    @property
    def model(self) -> Any:
        return self.explainer.model

    @property
    def core(self) -> Any:
        """The explainer's Keras core backend (:class:`~bbdecoder.backends.keras_core.KerasBackend`)."""
        return self.explainer.backend

    # -- boundary ---------------------------------------------------------------------------------
    def check_inputs(self, inputs: Any, min_dim: int) -> torch.Tensor:
        result: torch.Tensor = self.core.prepare(inputs, min_dim)
        return result

    def to_native_map(self, maps: torch.Tensor) -> Any:
        return self.core.to_framework(maps)

    def to_native_input(self, inputs: torch.Tensor) -> Any:
        return self.core.to_framework(inputs)

    def sample_shape(self, native: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in native)
        return (shape[-1], *shape[:-1]) if len(shape) >= 2 else shape

    def native_to_channel_first(self, tensor: torch.Tensor, input_dims: int) -> torch.Tensor:
        return tensor.movedim(-1, 1) if tensor.dim() == input_dims else tensor

    def reference_tensor(self) -> torch.Tensor:
        dtype = str(getattr(self.model, "compute_dtype", "float32"))
        return torch.empty(0, dtype=getattr(torch, dtype, torch.float32))

    def forward(self, x: Any) -> Any:
        """The model's output for channels-last ``x``: the input transform applied, inference mode, a
        final softmax/sigmoid looked through (``scores_from="logits"``; see the core backend)."""
        return self.core.output(x)

    def model_call(self, x: Any) -> Any:
        """As :meth:`forward` for ``x`` that is already the model's input (no input transform)."""
        core = self.core
        transform = core.input_transform
        core.input_transform = None
        try:
            return core.output(x)
        finally:
            core.input_transform = transform

    def select(self, output: Any, target: TargetLike, rows: int) -> Any:
        """One differentiable score per row from the Keras output (torch class tensors converted)."""
        return self.core._select(output, self.core.user_target(target), None, rows)

    # -- layers -----------------------------------------------------------------------------------
    def find_layers(self, selection: Any) -> list[LayerRef]:
        items = selection if isinstance(selection, (list, tuple)) else [selection]
        layers = [layer for layer in all_layers(self.model) if layer is not self.model]
        chosen: dict[int, LayerRef] = {}
        for selector in items:
            for layer in self._select(layers, selector):
                chosen.setdefault(id(layer), LayerRef(layer.name, layer))
        return list(chosen.values())

    def _select(self, layers: list[Any], selector: Any) -> list[Any]:
        if isinstance(selector, keras.layers.Layer):
            if not any(layer is selector for layer in layers):
                raise ValueError(f"the layer {selector.name!r} is not part of the model {self.model.name!r}")
            return [selector]
        if isinstance(selector, bool):
            raise TypeError(f"a layer selector cannot be a bool ({selector!r})")
        if isinstance(selector, int):
            leaves = leaf_layers(self.model)
            if not -len(leaves) <= selector < len(leaves):
                raise ValueError(
                    f"layer ID {selector} is out of range: the model has {len(leaves)} leaf layers"
                )
            return [leaves[selector]]
        if isinstance(selector, type):
            found = [layer for layer in layers if isinstance(layer, selector)]
            if not found:
                raise ValueError(f"the model has no layer of type {selector.__name__}")
            return found
        if isinstance(selector, str):
            if set("*?[") & set(selector):
                found = [layer for layer in layers if fnmatch.fnmatchcase(layer.name, selector)]
                if not found:
                    raise ValueError(f"the pattern {selector!r} matches 0 layers of the model")
                return found
            found = [layer for layer in layers if layer.name == selector]
            if len(found) != 1:
                names = ", ".join(layer.name for layer in leaf_layers(self.model))
                raise ValueError(
                    f"the layer name {selector!r} matches {len(found)} layers of the model; it must name "
                    f"exactly one. Leaf layers: {names}"
                )
            return found
        raise TypeError(
            f"cannot select layers with {selector!r} ({type(selector).__name__}); use a layer, a name or "
            "glob pattern, an int leaf ID, a layer type, or a list of these"
        )

    def default_layers(self, cam: Any, inputs: torch.Tensor) -> list[LayerRef]:
        """The trunk's last feature map: the last layer call, in order of completion, whose output is a
        spatial map; a block's (or nested model's) output completes after its branches, so branches
        are never chosen. Of the layers that return that same tensor the innermost is named, skipping
        pass-throughs (Dropout, Identity)."""
        events: list[tuple[Any, Any, bool]] = []  # (layer, output, is a pass-through)

        def record(layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            output = call(*args, **kwargs)
            if isinstance(output, tf.Tensor):
                passthrough = any(output is a for a in (*args, *kwargs.values()))
                events.append((layer, output, passthrough))
            return output

        layers = [layer for layer in all_layers(self.model) if layer is not self.model]
        with intercepted_calls(layers, record):
            self.forward(self.to_native_input(inputs[:1]))
        probe = inputs[:1]
        chosen = None
        for layer, output, _ in reversed(events):
            if cam.reshape is None and output.shape.rank != probe.dim():
                continue
            try:
                tensor = cam.to_channel_first(layer.name, to_torch(output), probe)
            except (ValueError, TypeError):
                continue
            if tensor.shape[2:].numel() > 1 and (cam.reshape is not None or _plausible(tensor, probe)):
                chosen = (layer, output)
                break
        if chosen is None:
            raise ValueError(
                f"found no layer with a spatial output for {cam.method_name} (no layer outputs a map with "
                f"the input's {probe.dim()} dims and more than one position); pass `layer=` (a layer, "
                "name or ID), and `reshape=` if its output is a token sequence"
            )
        for layer, output, passthrough in events:
            if output is chosen[1] and not passthrough:
                return [LayerRef(layer.name, layer)]
        return [LayerRef(chosen[0].name, chosen[0])]

    def capture(
        self, inputs: torch.Tensor, target: TargetLike, layers: Sequence[LayerRef], *, gradients: bool
    ) -> tuple[list[LayerCapture], TargetLike]:
        method = getattr(self.explainer, "method_name", type(self.explainer).__name__)
        index = {id(ref.layer): i for i, ref in enumerate(layers)}
        outputs: list[Any] = [None] * len(layers)
        calls = [0] * len(layers)
        tape = tf.GradientTape(persistent=False, watch_accessed_variables=False)

        def record(layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            output = call(*args, **kwargs)
            i = index[id(layer)]
            if not isinstance(output, tf.Tensor):
                raise TypeError(
                    f"{method} needs a layer with a tensor output; layer {layers[i].name!r} returned a "
                    f"{type(output).__name__}"
                )
            calls[i] += 1
            if gradients:
                tape.watch(output)
            outputs[i] = output
            return output

        x = self.to_native_input(inputs)
        n = int(inputs.shape[0])
        with (
            tape if gradients else contextlib.nullcontext(),
            intercepted_calls([r.layer for r in layers], record),
        ):
            output = self.forward(x)
            scores = self.select(output, target, n) if gradients else None
            total = tf.reduce_sum(scores) if scores is not None else None
        for i, ref in enumerate(layers):
            if calls[i] == 0:
                raise RuntimeError(
                    f"the {method} layer {ref.name!r} did not run in the forward pass; choose a layer that "
                    "the model calls"
                )
        frozen = _frozen(output, self.core.user_target(target), n)
        grads: list[Any] = [None] * len(layers)
        if gradients:
            grads = tape.gradient(total, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        captures = [
            LayerCapture(
                ref.name,
                ref.layer,
                to_torch(outputs[i]),
                to_torch(grads[i]) if grads[i] is not None else None,
                calls[i],
            )
            for i, ref in enumerate(layers)
        ]
        return captures, frozen

    def progress_session(self) -> Any:
        return contextlib.nullcontext()

    def row_scores(
        self,
        batch: torch.Tensor,
        samples: torch.Tensor,
        target: TargetLike,
        replacement: Replacement | None = None,
    ) -> torch.Tensor:
        x = self.to_native_input(batch)
        if replacement is None:
            output = self.forward(x)
        else:
            seen = [0]
            value = to_tf(replacement.value)

            def replace(_layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                output = call(*args, **kwargs)
                seen[0] += 1
                return tf.cast(value, output.dtype) if seen[0] == replacement.call else output

            try:
                with intercepted_calls([replacement.layer], replace):
                    output = self.forward(x)
            except tf.errors.OpError as err:  # a replacement with more rows than the layers below
                raise RuntimeError(f"the forward pass with a replaced layer output failed: {err}") from err
        row_target = target_rows(target, samples)
        return to_torch(self.select(output, row_target, int(samples.shape[0])))

    # -- bias layers ------------------------------------------------------------------------------
    def bias_layers(self) -> list[LayerRef]:
        return [LayerRef(layer.name, layer) for layer in all_layers(self.model) if is_bias_layer(layer)]

    def model_input(self, inputs: torch.Tensor) -> torch.Tensor:
        transform = self.explainer.input_transform
        if transform is None:
            return inputs
        return self.core.from_framework(tf.stop_gradient(transform(self.to_native_input(inputs))))

    def backward_through_biases(
        self, x: torch.Tensor, target: TargetLike, handler: BiasHandler, *, strict: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        calls: list[tuple[Any, Any, Any, int]] = []  # (layer, pre-activation output, bias, axis)
        tape = tf.GradientTape(watch_accessed_variables=False)

        def keep(layer: Any, output: Any) -> Any:
            if isinstance(output, tf.Tensor) and output.dtype.is_floating:
                bias = effective_bias(layer, output.dtype)
                if bias is not None:
                    tape.watch(output)
                    calls.append((layer, output, bias, channel_axis(layer, output.shape.rank)))
            return output

        def record(layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if stock_class(layer) is not None:  # a subclass: read inside, at the stock call's output
                before = len(calls)
                output = call(*args, **kwargs)
                if len(calls) == before and effective_bias(layer, tf.float32) is not None:
                    if strict:
                        # Raised after the pass: Keras rewraps errors raised inside a call.
                        unreachable.append(layer)
                    else:
                        keep(layer, output)
                return output
            with without_activation(layer) as activation:
                output = call(*args, **kwargs)
            output = keep(layer, output)
            return activation(output) if activation is not None else output

        unreachable: list[Any] = []
        layers = [ref.layer for ref in self.bias_layers()]
        subclassed = [layer for layer in layers if stock_class(layer) is not None]
        native = self.to_native_input(x)
        n = int(x.shape[0])
        with tape, intercepted_calls(layers, record), stock_calls_captured(subclassed, keep):
            tape.watch(native)
            scores = self.select(self.model_call(native), target, n)
            total = tf.reduce_sum(scores)
        if unreachable:
            raise KerasUnreachableBiasError(unreachable[0].name, unreachable[0])
        sources = [native, *(output for _, output, _, _ in calls)]
        gradients = tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for (layer, _, bias, axis), grad in zip(calls, gradients[1:], strict=True):
            grad_cf = to_torch(grad).movedim(axis, 1)
            shape = [1] * grad_cf.dim()
            shape[1] = -1
            handler(layer.name, to_torch(bias).view(shape), grad_cf)
        return channels_first(to_torch(gradients[0])), to_torch(scores)


def _plausible(tensor: torch.Tensor, inputs: torch.Tensor) -> bool:
    """A channel-first map's spatial dims shrink by similar strides (not a misread token sequence)."""
    strides = [i / o for i, o in zip(inputs.shape[2:], tensor.shape[2:], strict=True)]
    return min(strides) >= 1 and max(strides) / min(strides) <= 2.0


def _frozen(output: Any, target: TargetLike, n: int) -> TargetLike:
    native: Any = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else target
    if not is_callable_target(native):
        from bbdecoder.backends.keras_core import logits_entry

        scores = logits_entry(output)  # a dict output's logits, as for the input-space methods
        output = output if scores is None else scores
    frozen: Any = fixed_target(output, native, n)
    result: TargetLike = to_torch(frozen) if isinstance(frozen, tf.Tensor) else frozen
    return result


__all__ = [
    "BIAS_LAYER_TYPES",
    "KerasLayers",
    "KerasUnreachableBiasError",
    "channel_axis",
    "effective_bias",
    "is_bias_layer",
    "is_keras_model",
    "stock_calls_captured",
]
