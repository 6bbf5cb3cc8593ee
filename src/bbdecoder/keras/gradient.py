"""Gradient and Input x Gradient for Keras models."""

from __future__ import annotations

from typing import Any

from bbdecoder.keras.base import KerasExplainer, check_inputs
from bbdecoder.keras.targets import KerasTargetLike


class Gradient(KerasExplainer):
    """The signed gradient of the target score with respect to the input (Simonyan et al. 2014)."""

    def attribute(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """dScore/dInput, a tf.Tensor shaped like ``inputs`` (N, *spatial, C)."""
        grad, _ = self.input_gradient(check_inputs(inputs), target)
        return grad


class InputXGradient(KerasExplainer):
    """``inputs * dScore/dInput`` (Shrikumar et al. 2016)."""

    def attribute(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """``inputs * gradient``, a tf.Tensor shaped like ``inputs`` (N, *spatial, C)."""
        x = check_inputs(inputs)
        grad, _ = self.input_gradient(x, target)
        return x * grad


__all__ = ["Gradient", "InputXGradient"]
