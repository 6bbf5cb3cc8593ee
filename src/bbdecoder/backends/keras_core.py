"""The Keras 3 backend: ``tf.GradientTape`` in eager mode, channels-last at the boundary.

The shared method code sees channel-first torch tensors; this backend converts a batch
``(N, *spatial, C)`` (``tf.Tensor`` or NumPy array, float32 or float64) to ``(N, C, *spatial)`` on the
way in and every result back to a channels-last ``tf.Tensor`` on the way out. The model runs with
``training=False`` (BatchNormalization's moving statistics, no dropout), so calls change nothing.

**Probability heads** (``scores_from="logits"``, the default, as on PyTorch): a model whose output is
produced by a final softmax, log-softmax or sigmoid, as ``keras.applications`` builds by default,

* a ``Dense``/``Conv`` layer with ``activation="softmax"`` (or ``"sigmoid"``, ``"log_softmax"``): the
  layer runs with its activation set to linear for the length of the call (restored on exit, also on
  errors), so its pre-activation output, the logits, is explained;
* a final ``Activation("softmax")``/``Softmax``/``Activation("sigmoid")`` layer: its input is returned
  in place of its output;

is explained through its logits. Found through the functional graph (the layer producing the model's
output, following nested models and a ``Sequential``'s last layer). A model returning probabilities
without such a layer (a ``tf.nn.softmax`` inside a subclassed ``call``) is refused with
:class:`~bbdecoder.attribution.outputs.ProbabilityOutputError` (rows in [0, 1] summing to 1, or a
log-softmax's); ``scores_from="output"`` explains what the model returns, as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from bbdecoder.attribution.outputs import ProbabilityOutputError, check_scores_from, probability_kind
from bbdecoder.backends.base import Backend, FrozenTarget, Samples, channels_first, channels_last, nothing
from bbdecoder.keras._backend import keras, tf
from bbdecoder.keras.base import check_inputs
from bbdecoder.keras.layers import LayerCall, check_model, intercepted_calls, leaf_layers
from bbdecoder.keras.targets import _as_logits, select_scores
from bbdecoder.targets import TargetError, TargetLike

KerasInputTransform = Callable[[Any], Any]

_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "log_softmax")


class KerasBackend(Backend):
    """The backend of a Keras 3 model (functional, Sequential or subclassed).

    Args:
        model: the Keras model or layer; never modified (a fused head activation is switched off only
            for the length of a call and restored).
        input_transform: applied to the channels-last inputs inside every forward pass.
        scores_from: ``"logits"`` (a final softmax/sigmoid looked through) or ``"output"``.
    """

    framework: ClassVar[str] = "keras"

    def __init__(
        self, model: Any, *, input_transform: KerasInputTransform | None = None, scores_from: str = "logits"
    ) -> None:
        self.model = check_model(model)
        self.input_transform = input_transform
        self.scores_from = check_scores_from(scores_from)
        self.head = probability_head(self.model) if self.scores_from == "logits" else None

    # -- layout ----------------------------------------------------------------------------------
    def prepare(self, inputs: Any, min_dim: int = 2) -> torch.Tensor:
        return channels_first(torch.from_numpy(np.array(check_keras_inputs(inputs, min_dim).numpy())))

    def to_framework(self, value: torch.Tensor) -> Any:
        return _tf_tensor(channels_last(value))

    def from_framework(self, value: Any) -> torch.Tensor:
        if not isinstance(value, (tf.Tensor, np.ndarray)):
            raise TypeError(f"expected a tf.Tensor from the inner explainer, got {type(value).__name__}")
        array = value.numpy() if isinstance(value, tf.Tensor) else value
        return channels_first(torch.from_numpy(np.array(array)))

    def user_array(self, value: Any, rank: int) -> Any:
        if not isinstance(value, (tf.Tensor, np.ndarray)):
            return value
        array = np.array(value.numpy() if isinstance(value, tf.Tensor) else value)
        if array.ndim == 0:
            return torch.from_numpy(array)
        if array.ndim < rank and array.ndim >= 3:
            array = array.reshape((1,) * (rank - array.ndim) + array.shape)  # (H, W, C) -> (1, H, W, C)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if array.ndim == rank:
            return channels_first(tensor).contiguous()
        if array.ndim == 1 and rank >= 3:  # one value per channel
            return tensor.view((1, -1) + (1,) * (rank - 2))
        return tensor  # spatial only (H, W): the same in both layouts

    def user_shape(self, value: Any, rank: int) -> Any:
        if isinstance(value, (int, np.integer)) or rank < 3:
            return value
        parts = tuple(int(v) for v in value)
        return (parts[-1], *parts[:-1]) if len(parts) == rank - 1 else parts

    def user_target(self, target: Any) -> TargetLike:
        if isinstance(target, tf.Tensor):
            return torch.from_numpy(np.array(target.numpy()))
        if isinstance(target, np.ndarray):
            return torch.from_numpy(np.array(target))
        return target

    def target_to_framework(self, target: FrozenTarget) -> Any:
        if isinstance(target, torch.Tensor):
            return tf.constant(target.detach().cpu().numpy())
        return target

    # -- the model -------------------------------------------------------------------------------
    def session(self) -> contextlib.AbstractContextManager[Any]:
        return nothing()

    def output(self, x: Any) -> Any:
        """The model's output for a channels-last batch (a ``tf`` value), the head looked through."""
        inputs = self.input_transform(x) if self.input_transform is not None else x
        with self.logits_view():
            output = self.model(inputs, training=False)
        scores = logits_entry(output)
        if self.scores_from == "logits" and self.head is None and scores is not None:
            kind = probability_kind(torch.from_numpy(np.array(tf.stop_gradient(scores).numpy())))
            if kind is not None:
                raise ProbabilityOutputError(
                    f"the Keras model's output looks like {kind} probabilities (every row sums to 1 over "
                    f"{scores.shape[-1]} classes) but no final softmax layer produced it (a tf.nn.softmax "
                    "inside call?), so the logits beneath cannot be reached. Explanations of probabilities "
                    "couple every class; return the logits (or end the model in a Dense(..., "
                    "activation='softmax') or Softmax layer, whose logits are then explained), or pass "
                    "scores_from='output' to explain the probabilities as they are"
                )
        return output

    @contextlib.contextmanager
    def logits_view(self) -> Iterator[None]:
        """Inside the block a final probability activation is looked through (see the module docstring)."""
        if self.head is None:
            yield
            return
        layer, fused = self.head
        if fused:
            activation = vars(layer)["activation"]
            object.__setattr__(layer, "activation", keras.activations.get("linear"))
            try:
                yield
            finally:
                object.__setattr__(layer, "activation", activation)
            return

        def identity(_layer: Any, _call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return args[0] if args else next(iter(kwargs.values()))

        with intercepted_calls([layer], identity):
            yield

    def _native(self, x: torch.Tensor) -> Any:
        return _tf_tensor(channels_last(x))

    def logits(self, x: torch.Tensor, samples: Samples = None) -> torch.Tensor:
        output = self.output(self._native(x))
        return _to_torch(_as_logits(output, x.shape[0]))

    def target_scores(self, x: torch.Tensor, target: FrozenTarget, samples: Samples = None) -> torch.Tensor:
        output = self.output(self._native(x))
        return _to_torch(self._select(output, target, samples, x.shape[0]))

    def input_gradient(
        self, x: torch.Tensor, target: TargetLike, samples: Samples = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        point = self._native(x)
        with tf.GradientTape() as tape:
            tape.watch(point)
            scores = self._select(self.output(point), target, samples, x.shape[0])
            total = tf.reduce_sum(scores)
        grad = tape.gradient(total, point, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return channels_first(_to_torch(grad)), _to_torch(scores)

    def _select(self, output: Any, target: Any, samples: Samples, rows: int) -> Any:
        if isinstance(target, torch.Tensor):
            target = target.numpy()
        return select_scores(output, target, rows)  # a dict's ``logits`` for class targets

    # -- memory ----------------------------------------------------------------------------------
    def activation_bytes_per_row(self, x: torch.Tensor) -> int:
        one = self._native(x[:1])
        total = [int(one.shape.num_elements()) * one.dtype.size * (2 if self.input_transform else 1)]

        def count(_layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            output = call(*args, **kwargs)
            tensors = [t for t in tf.nest.flatten(output) if isinstance(t, tf.Tensor)]
            total[0] += sum(int(t.shape.num_elements()) * t.dtype.size for t in tensors)
            return output

        with intercepted_calls(leaf_layers(self.model), count):
            self.output(one)
        return total[0]


def check_keras_inputs(inputs: Any, min_dim: int = 2) -> Any:
    """A batch of inputs as a finite floating ``tf.Tensor`` (N, ...): Keras's
    :func:`~bbdecoder.keras.base.check_inputs` (NumPy converted, floating, batched, non-empty), then
    NaN/Inf refused as on the PyTorch side."""
    x = check_inputs(inputs, min_dim)
    if not bool(tf.reduce_all(tf.math.is_finite(x))):
        raise ValueError(
            f"inputs contain NaN or infinite values (shape {tuple(x.shape)}); attributions of non-finite "
            "inputs are meaningless. Clean or drop those samples first (e.g. tf.where(tf.math.is_finite(x), "
            "x, 0.0))"
        )
    return x


def probability_head(model: Any) -> tuple[Any, bool] | None:
    """The layer whose softmax/sigmoid makes the model's output, and whether the activation is fused.

    ``(layer, True)``: a layer with ``activation="softmax"`` (Dense, Conv, ...); ``(layer, False)``: an
    ``Activation``/``Softmax`` layer whose input is the logits; ``None``: no such final layer (or a
    model with several outputs, or a subclassed one whose graph is not known).
    """
    layer = _output_layer(model)
    seen: set[int] = set()
    while layer is not None and id(layer) not in seen:
        seen.add(id(layer))
        if isinstance(layer, keras.layers.Softmax):
            return layer, False
        activation = vars(layer).get("activation")
        name = _activation_name(activation)
        if name in _PROBABILITY_ACTIVATIONS:
            return layer, not isinstance(layer, keras.layers.Activation)
        if isinstance(layer, keras.Model):
            layer = _output_layer(layer)
            continue
        return None
    return None


def _output_layer(model: Any) -> Any:
    if isinstance(model, keras.Sequential):
        layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        return layers[-1] if layers else None
    outputs = getattr(model, "_outputs", None) if isinstance(model, keras.Model) else None
    if outputs is None:
        try:
            outputs = model.outputs
        except (AttributeError, ValueError):
            return None
    flat = tf.nest.flatten(outputs) if outputs is not None else []
    if len(flat) != 1:
        return None
    history = getattr(flat[0], "_keras_history", None)
    return history[0] if history is not None else None


def _activation_name(activation: Any) -> str | None:
    if activation is None:
        return None
    name = getattr(activation, "__name__", None)
    if name is None:
        return None
    return str(name)


def logits_entry(output: Any) -> Any:
    """The class-score tensor of a Keras output: the tensor itself, or the ``logits`` entry of a dict
    (PyTorch's ``ModelOutput`` convention); ``None`` otherwise."""
    if isinstance(output, tf.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), tf.Tensor):
        return output["logits"]
    return None


def _tf_tensor(value: torch.Tensor) -> Any:
    """A ``tf.Tensor`` with a copy of ``value`` (``tf.constant`` may keep using a NumPy buffer, and the
    torch tensor's memory may be written later)."""
    return tf.constant(np.array(value.detach().cpu().numpy(), copy=True, order="C"))


def _to_torch(value: Any) -> torch.Tensor:
    if not isinstance(value, tf.Tensor):
        raise TargetError(f"expected a tensor, got {type(value).__name__}")
    return torch.from_numpy(np.array(tf.stop_gradient(value).numpy()))


__all__ = ["KerasBackend", "KerasInputTransform", "check_keras_inputs", "probability_head"]
