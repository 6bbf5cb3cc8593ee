"""The shared base of the Keras explainers: inputs, model calls, targets, one GradientTape pass.

Mirrors :class:`bbdecoder.attribution.base.Explainer` for Keras 3 models with channels-last inputs
(N, *spatial, C). The model always runs in inference mode (``training=False``: BatchNormalization's
moving statistics, no dropout); nothing of the model is changed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from bbdecoder.attribution.keywords import checked_keywords, forwards_keywords
from bbdecoder.keras._backend import tf
from bbdecoder.keras.layers import check_model
from bbdecoder.keras.targets import KerasTargetLike, fixed_target, is_callable_target, select_scores

KerasInputTransform = Callable[[Any], Any]


class KerasExplainer:
    """Base class of every Keras explainer.

    Args:
        model: a Keras 3 model (functional, Sequential or subclassed) or layer returning logits
            (N, classes), or anything with a callable target. Never modified.
        input_transform: applied to the inputs inside every forward pass (e.g. a normalisation), so
            attributions are taken with respect to the untransformed inputs. ``None``: as they are.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # An unknown keyword is refused with the nearest valid name, never ignored (as for PyTorch).
        super().__init_subclass__(**kwargs)
        for name in ("attribute", "saliency"):
            method = cls.__dict__.get(name)
            if callable(method):
                setattr(cls, name, checked_keywords(method, torch_conventions=False))

    def __init__(self, model: Any, *, input_transform: KerasInputTransform | None = None) -> None:
        self.model = check_model(model)
        self.input_transform = input_transform

    def forward(self, inputs: Any) -> Any:
        """The model's raw output for ``inputs`` in inference mode (the input transform applied)."""
        x = self.input_transform(inputs) if self.input_transform is not None else inputs
        return self.model(x, training=False)

    def scores(self, inputs: Any, target: KerasTargetLike) -> tuple[Any, Any]:
        """One score per sample (N,) and the raw output; differentiable when called under a tape."""
        output = self.forward(inputs)
        return select_scores(output, target, int(inputs.shape[0])), output

    def freeze_target(self, inputs: Any, target: KerasTargetLike) -> KerasTargetLike:
        """``None`` resolved to the arg-max classes of the clean inputs (for noisy and path methods)."""
        if is_callable_target(target):
            return target
        return fixed_target(self.forward(inputs), target, int(inputs.shape[0]))

    def input_gradient(self, inputs: Any, target: KerasTargetLike) -> tuple[Any, Any]:
        """dScore/dInput shaped like ``inputs`` and the scores (N,), from one forward+backward."""
        x = tf.convert_to_tensor(inputs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores, _ = self.scores(x, target)
            total = tf.reduce_sum(scores)
        grad = tape.gradient(total, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grad, tf.stop_gradient(scores)

    @functools.partial(checked_keywords, torch_conventions=False)
    def attribute(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """Attribution shaped like ``inputs`` (N, *spatial, C), a tf.Tensor."""
        raise NotImplementedError(f"{type(self).__name__} has no input-space attribution")

    @functools.partial(checked_keywords, torch_conventions=False)
    @forwards_keywords(lambda self: self.attribute)
    def saliency(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """Non-negative map (N, *spatial, 1): ``|attribution|`` summed over the channel (last) axis."""
        return tf.reduce_sum(tf.abs(self.attribute(inputs, target, **kwargs)), axis=-1, keepdims=True)

    def __call__(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        return self.attribute(inputs, target, **kwargs)


def check_inputs(inputs: Any, min_dim: int = 2) -> Any:
    """A batch of inputs as a floating tf.Tensor (N, ...); NumPy arrays are converted."""
    if not isinstance(inputs, (tf.Tensor, np.ndarray)):
        raise TypeError(f"inputs must be a tf.Tensor or a NumPy array, got {type(inputs).__name__}")
    x = tf.convert_to_tensor(inputs)
    if not x.dtype.is_floating:
        raise TypeError(
            f"inputs must be floating point (gradients need it), got {x.dtype.name}; "
            "use tf.cast(x, 'float32')"
        )
    if x.shape.rank < min_dim:
        raise ValueError(
            f"inputs must be a batch (N, ...) with at least {min_dim} dims, got shape {tuple(x.shape)}; "
            "add the batch dimension with x[None]"
        )
    if x.shape[0] == 0:
        raise ValueError("inputs is an empty batch (N = 0)")
    return x


__all__ = ["KerasExplainer", "KerasInputTransform", "check_inputs"]
