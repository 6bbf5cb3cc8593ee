"""FullGrad (Srinivas & Fleuret, NeurIPS 2019) and Simple FullGrad for Keras 3 models.

The same algorithm as :mod:`bbdecoder.attribution.fullgrad`, through ``tf.GradientTape``:

    F(x) = sum(x * dF/dx) + sum over bias-layer calls l of sum(dF/d output_l * b_l)

Every call of a bias layer (Conv*, Dense, BatchNormalization; see :mod:`bbdecoder.keras.bias_layers`)
is intercepted for the length of one forward pass: its output is recorded and watched, and its bias is
read at that moment. Gradients are matched to layers *by call*, so unused layers shift nothing and a
layer called twice contributes twice. A layer with a fused activation (``Conv2D(..., activation="relu")``)
contributes the gradient at its pre-activation output, where its bias is added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bbdecoder.attribution.fullgrad import CompletenessError
from bbdecoder.keras._backend import tf
from bbdecoder.keras.base import KerasExplainer, KerasInputTransform, check_inputs
from bbdecoder.keras.bias_layers import broadcast_bias, channel_axis, effective_bias, is_bias_layer
from bbdecoder.keras.layers import LayerCall, all_layers, intercepted_calls, without_activation
from bbdecoder.keras.postprocess import channel_sum_minmax, resize_to
from bbdecoder.keras.targets import KerasTargetLike, select_scores

LayerMap = Callable[[Any, Any], Any]


def default_tolerance(dtype: Any) -> float:
    """Relative tolerance of the completeness check: 1e-4 in float32 (the reference's), 1e-8 in float64."""
    return 1e-8 if tf.as_dtype(dtype) == tf.float64 else 1e-4


def relative_error(totals: Any, scores: Any) -> Any:
    """|totals - scores| / max(|totals|, |scores|) per sample (N,)."""
    tiny = np.finfo(scores.dtype.as_numpy_dtype).tiny
    scale = tf.maximum(tf.maximum(tf.abs(totals), tf.abs(scores)), tiny)
    return tf.abs(totals - scores) / scale


@dataclass
class BiasLayerCall:
    """One call of a bias layer: its (pre-activation) output, its bias broadcast to it, the bias axis."""

    layer: Any
    output: Any
    bias: Any
    axis: int


@dataclass
class FullGradDecomposition:
    """The parts of F(x) for a batch (all tf.Tensors).

    Attributes:
        inputs: the model's inputs (N, *spatial, C) (after ``input_transform``).
        input_gradient: dF/dx, shaped like ``inputs``.
        bias_gradients: one tensor per bias-layer *call*, in call order, each shaped like that call's
            output: ``dF/d output * b`` with b broadcast along the layer's channel axis.
        layer_names: the name of the layer behind each bias gradient.
        scores: F(x), the target scores (N,).
    """

    inputs: Any
    input_gradient: Any
    bias_gradients: list[Any]
    layer_names: list[str]
    scores: Any

    def totals(self) -> Any:
        """sum(x * dF/dx) + sum of all bias gradients, per sample (N,)."""
        total = _per_sample_sum(self.inputs * self.input_gradient)
        for bias_gradient in self.bias_gradients:
            total = total + tf.cast(_per_sample_sum(bias_gradient), total.dtype)
        return total

    def relative_error(self) -> Any:
        """|totals - scores| / max(|scores|, |totals|), per sample (N,)."""
        return relative_error(tf.cast(self.totals(), self.scores.dtype), self.scores)


def _per_sample_sum(values: Any) -> Any:
    return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


class _FullGradFamily(KerasExplainer):
    """Intercepts bias layers, runs one forward+backward, returns every call's output gradient."""

    def __init__(self, model: Any, *, input_transform: KerasInputTransform | None = None) -> None:
        super().__init__(model, input_transform=input_transform)
        self.bias_layers = [layer for layer in all_layers(model) if is_bias_layer(layer)]

    def _model_input(self, inputs: Any) -> Any:
        # The decomposition lives in the model's input space: a normalisation's constant offset is not a
        # bias of any layer, so the transform is applied outside the differentiated graph.
        return inputs if self.input_transform is None else tf.stop_gradient(self.input_transform(inputs))

    def _backward_through_layers(
        self, inputs: Any, target: KerasTargetLike
    ) -> tuple[Any, Any, Any, list[BiasLayerCall], list[Any]]:
        """(model input, dF/d input, scores, bias-layer calls, dF/d output of each call)."""
        x = self._model_input(check_inputs(inputs, min_dim=3))
        calls: list[BiasLayerCall] = []
        tape = tf.GradientTape()

        def record(layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            with without_activation(layer) as activation:
                output = call(*args, **kwargs)
            if isinstance(output, tf.Tensor) and output.dtype.is_floating:
                bias = effective_bias(layer, output.dtype)
                if bias is not None:
                    tape.watch(output)
                    rank = output.shape.rank
                    axis = channel_axis(layer, rank)
                    calls.append(BiasLayerCall(layer, output, broadcast_bias(bias, axis, rank), axis))
            return activation(output) if activation is not None else output

        with tape, intercepted_calls(self.bias_layers, record):
            tape.watch(x)
            scores = select_scores(self.model(x, training=False), target, int(x.shape[0]))
            total = tf.reduce_sum(scores)
        sources = [x, *(call.output for call in calls)]
        gradients = tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return x, gradients[0], tf.stop_gradient(scores), calls, list(gradients[1:])

    def _aggregate(self, inputs: Any, target: KerasTargetLike, layer_map: LayerMap) -> tuple[Any, Any, Any]:
        """Saliency (N, *spatial, 1) from ``layer_map(grad, bias)``, plus per-sample totals and scores."""
        x, input_gradient, scores, calls, gradients = self._backward_through_layers(inputs, target)
        spatial = tuple(int(s) for s in x.shape[1:-1])
        input_part = x * input_gradient
        saliency = channel_sum_minmax(input_part)
        totals = _per_sample_sum(input_part)
        for call, grad in zip(calls, gradients, strict=True):
            totals = totals + tf.cast(_per_sample_sum(grad * call.bias), totals.dtype)
            if grad.shape.rank != x.shape.rank:
                continue
            layer_saliency = channel_sum_minmax(layer_map(grad, call.bias), axis=call.axis)
            saliency = saliency + tf.cast(
                resize_to(layer_saliency, spatial, align_corners=True), saliency.dtype
            )
        return saliency, totals, scores


class FullGrad(_FullGradFamily):
    """FullGrad saliency for Keras models, with the reference interface.

    Args:
        model: a piecewise-linear Keras 3 network with biases (Conv/Dense/BatchNormalization, ReLU,
            pooling, residual adds, concatenation): functional, Sequential or subclassed, nested blocks
            included. Never modified; it runs with ``training=False``.
        im_size: one sample's shape without the batch dimension, channels last, e.g. ``(224, 224, 3)``.
            When given, completeness is checked at construction on a random input; otherwise at the
            first call, on a random input shaped like that call's samples.
        input_transform: applied before the model; the decomposition and the map are then of the
            *transformed* input, as in the reference.
        check: run the completeness check (raises :class:`~bbdecoder.CompletenessError`).

    >>> fullgrad = FullGrad(model, im_size=(224, 224, 3))
    >>> saliency = fullgrad.saliency(x, target)            # (N, 224, 224, 1)
    >>> input_grad, bias_grads = fullgrad.fullGradientDecompose(x, target)
    """

    def __init__(
        self,
        model: Any,
        im_size: Sequence[int] | None = None,
        *,
        input_transform: KerasInputTransform | None = None,
        check: bool = True,
    ) -> None:
        super().__init__(model, input_transform=input_transform)
        self.im_size = tuple(int(s) for s in im_size) if im_size is not None else None
        self.check = check
        self._checked_shapes: set[tuple[int, ...]] = set()
        self.last_relative_error: Any = None
        if check and self.im_size is not None:
            self.checkCompleteness()

    # -- decomposition ---------------------------------------------------------------------------
    def decompose(self, inputs: Any, target: KerasTargetLike = None) -> FullGradDecomposition:
        """The full-gradient decomposition of the target scores of ``inputs`` (N, *spatial, C)."""
        self._check_batch(inputs)
        x, input_gradient, scores, calls, gradients = self._backward_through_layers(inputs, target)
        bias_gradients = [grad * call.bias for call, grad in zip(calls, gradients, strict=True)]
        names = [call.layer.name for call in calls]
        return FullGradDecomposition(x, input_gradient, bias_gradients, names, scores)

    def fullGradientDecompose(
        self, image: Any, target_class: KerasTargetLike = None
    ) -> tuple[Any, list[Any]]:
        """(input gradient shaped like ``image``, list of bias gradients shaped like each layer's output)."""
        decomposition = self.decompose(image, target_class)
        return decomposition.input_gradient, decomposition.bias_gradients

    full_gradient_decompose = fullGradientDecompose

    # -- completeness ----------------------------------------------------------------------------
    def checkCompleteness(
        self, inputs: Any = None, *, tolerance: float | None = None, seed: int = 0
    ) -> float:
        """Check sum(decomposition) == F(x); returns the worst relative error.

        On ``inputs``, or on a seeded standard-normal input of shape ``(1, *im_size)``. Raises
        :class:`~bbdecoder.CompletenessError` above ``tolerance`` (default 1e-4 when the model computes
        in float32, 1e-8 in float64).
        """
        if inputs is None:
            inputs = self._random_input(self._require_im_size(), seed)
        decomposition = self.decompose(inputs, None)
        worst = float(tf.reduce_max(decomposition.relative_error()))
        bound = default_tolerance(decomposition.scores.dtype) if tolerance is None else tolerance
        if not worst <= bound:  # also catches NaN
            raise CompletenessError(worst, bound)
        self._checked_shapes.add(tuple(int(s) for s in inputs.shape[1:]))
        return worst

    check_completeness = checkCompleteness

    # -- saliency --------------------------------------------------------------------------------
    def saliency(
        self,
        inputs: Any,
        target: KerasTargetLike = None,
        *,
        target_class: KerasTargetLike = None,
        **kwargs: Any,
    ) -> Any:
        """FullGrad saliency, non-negative, a tf.Tensor (N, *spatial, 1) at input resolution.

        ``target_class`` is accepted as the reference's name for ``target``. The per-sample relative
        completeness error of this very batch is left in ``last_relative_error`` (N,).
        """
        target = target_class if target is None else target
        x = self._check_batch(inputs)
        if self.check and tuple(int(s) for s in x.shape[1:]) not in self._checked_shapes:
            self.checkCompleteness(self._random_input(tuple(int(s) for s in x.shape[1:]), 0, like=x))
        result, totals, scores = self._aggregate(x, target, _bias_gradient)
        self.last_relative_error = relative_error(tf.cast(totals, scores.dtype), scores)
        return result

    def attribute(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """The input part of the decomposition, ``x * dF/dx``, shaped like ``inputs``."""
        decomposition = self.decompose(inputs, target)
        return decomposition.inputs * decomposition.input_gradient

    # -- helpers ---------------------------------------------------------------------------------
    def _require_im_size(self) -> tuple[int, ...]:
        if self.im_size is None:
            raise ValueError("no im_size: pass `im_size=(H, W, C)` to FullGrad or give `inputs` to check")
        return self.im_size

    def _check_batch(self, inputs: Any) -> Any:
        x = check_inputs(inputs, min_dim=3)
        if self.im_size is not None and tuple(int(s) for s in x.shape) == self.im_size:
            raise ValueError(
                f"inputs of shape {tuple(x.shape)} look like one sample without its batch dimension "
                f"(im_size={self.im_size}); use x[None]"
            )
        return x

    def _random_input(self, sample_shape: tuple[int, ...], seed: int, like: Any = None) -> Any:
        dtype = (
            like.dtype if like is not None else tf.as_dtype(getattr(self.model, "compute_dtype", "float32"))
        )
        sample = np.random.default_rng(seed).standard_normal((1, *sample_shape))
        return tf.constant(sample, dtype=dtype)


class SimpleFullGrad(_FullGradFamily):
    """Simple FullGrad: FullGrad's aggregation with ``|dF/d output_l|`` in place of the bias-gradient.

    Needs no completeness, so it works on any network (LayerNormalization, GELU, attention, ReLU6).
    """

    def saliency(
        self,
        inputs: Any,
        target: KerasTargetLike = None,
        *,
        target_class: KerasTargetLike = None,
        **kwargs: Any,
    ) -> Any:
        """Non-negative map, a tf.Tensor (N, *spatial, 1) at input resolution."""
        target = target_class if target is None else target
        result, _, _ = self._aggregate(inputs, target, _plain_gradient)
        return result

    def attribute(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """``x * dF/dx`` shaped like ``inputs`` (the input part of the map)."""
        x, input_gradient, _, _, _ = self._backward_through_layers(inputs, target)
        return x * input_gradient


def _bias_gradient(grad: Any, bias: Any) -> Any:
    return grad * bias


def _plain_gradient(grad: Any, bias: Any) -> Any:
    return grad


__all__ = [
    "BiasLayerCall",
    "CompletenessError",
    "FullGrad",
    "FullGradDecomposition",
    "SimpleFullGrad",
    "default_tolerance",
    "relative_error",
]
