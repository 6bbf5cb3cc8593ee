"""Gradient and Input x Gradient, written once over the backend (:mod:`bbdecoder.backends`)."""

from __future__ import annotations

from typing import Any

import torch

from bbdecoder.attribution.base import Explainer
from bbdecoder.attribution.layer_attribution import layer_gradient, uses_layer
from bbdecoder.targets import TargetLike


class Gradient(Explainer):
    """The signed gradient of the target score with respect to the input (Simonyan et al. 2014)."""

    def attribute(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """dScore/dInput, shaped like ``inputs`` (N, C, *spatial); at a layer, shaped like its output."""
        if uses_layer(self, inputs):
            return layer_gradient(self, inputs, target, times_activation=False, **kwargs)
        backend = self.backend
        x = backend.prepare(inputs)
        with backend.session():
            grad, _ = backend.input_gradient(x, backend.user_target(target))
        return backend.to_framework(grad)


class InputXGradient(Explainer):
    """``inputs * dScore/dInput`` (Shrikumar et al. 2016): exact for linear models without bias."""

    def attribute(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """``inputs * gradient``, shaped like ``inputs`` (N, C, *spatial); at a layer ``A * dScore/dA``."""
        if uses_layer(self, inputs):
            return layer_gradient(self, inputs, target, times_activation=True, **kwargs)
        backend = self.backend
        x = backend.prepare(inputs)
        with backend.session():
            grad, _ = backend.input_gradient(x, backend.user_target(target))
        return backend.to_framework(x * grad)
