"""The input-space methods on Keras: the shared classes of :mod:`bbdecoder.attribution` on the Keras
backend (see :mod:`bbdecoder.keras.front` for what changes at the boundary; nothing else does).

Each class here subclasses the PyTorch class of the same name, so constructor arguments, call
arguments, defaults, seeds and numbers are the same; inputs and results are channels last.
"""

from __future__ import annotations

from typing import Any

import torch

from bbdecoder.attribution import baselines as _baselines
from bbdecoder.attribution.feature_ablation import FeatureAblation as _FeatureAblation
from bbdecoder.attribution.gradient import Gradient as _Gradient
from bbdecoder.attribution.gradient import InputXGradient as _InputXGradient
from bbdecoder.attribution.gradient_shap import GradientSHAP as _GradientSHAP
from bbdecoder.attribution.integrated_gradients import IntegratedGradients as _IntegratedGradients
from bbdecoder.attribution.kernel_shap import KernelSHAP as _KernelSHAP
from bbdecoder.attribution.occlusion import Occlusion as _Occlusion
from bbdecoder.attribution.rise import RISE as _RISE
from bbdecoder.attribution.smoothgrad import SmoothGrad as _SmoothGrad
from bbdecoder.keras._backend import keras
from bbdecoder.keras.base import KerasExplainer
from bbdecoder.keras.baselines import keras_baseline
from bbdecoder.keras.front import KerasMethod


class _KerasBaselines:
    """``make_baseline`` on channels-last terms: names, numbers, arrays and callables as
    :func:`~bbdecoder.keras.keras_baseline` takes them."""

    backend: Any

    def make_baseline(self, baseline: Any, x: torch.Tensor) -> torch.Tensor:
        if isinstance(baseline, torch.Tensor):
            return _baselines.make_baseline(baseline, x)
        made = keras_baseline(baseline, self.backend.to_framework(x))
        return self.backend.from_framework(made).to(x.dtype)


class Gradient(KerasMethod, _Gradient):
    """The signed gradient of the target score with respect to the channels-last input."""


class InputXGradient(KerasMethod, _InputXGradient):
    """``inputs * dScore/dInput`` for a Keras model."""


class IntegratedGradients(_KerasBaselines, KerasMethod, _IntegratedGradients):
    """Integrated Gradients for a Keras model: the same quadrature, chunking and convergence delta
    as :class:`bbdecoder.IntegratedGradients`; baselines as :func:`~bbdecoder.keras.keras_baseline`."""


class GradientSHAP(_KerasBaselines, KerasMethod, _GradientSHAP):
    """GradientSHAP for a Keras model; ``baselines`` may be a reference set ``(B, *spatial, C)``."""


class SmoothGrad(KerasMethod, _SmoothGrad):
    """SmoothGrad around any Keras explainer (a bare Keras model is wrapped in :class:`Gradient`),
    streaming over the noisy copies with the memory rule of the PyTorch side; the same seed gives the
    same noise as :class:`bbdecoder.SmoothGrad`, transposed."""

    @staticmethod
    def _inner(explainer_or_model: Any, layer: Any = None) -> Any:
        if layer is not None:
            raise NotImplementedError("layer= is PyTorch-only: the Keras SmoothGrad adds noise at the input")
        if isinstance(explainer_or_model, (KerasMethod, KerasExplainer)):
            return explainer_or_model
        if isinstance(explainer_or_model, keras.layers.Layer):
            return Gradient(explainer_or_model)
        raise TypeError(
            "bbdecoder.keras.SmoothGrad wraps a Keras explainer or a Keras model, got "
            f"{type(explainer_or_model).__name__}"
        )


class Occlusion(KerasMethod, _Occlusion):
    """Occlusion for a Keras model; ``sliding_window_shapes``/``strides`` as ``(h, w)``, one int, or
    ``(h, w, C)`` over every non-batch dim (channels last)."""


class FeatureAblation(KerasMethod, _FeatureAblation):
    """Feature ablation for a Keras model; ``feature_mask`` channels last: ``(N or 1, H, W, C or 1)``
    or ``(H, W)``."""


class RISE(KerasMethod, _RISE):
    """RISE for a Keras model: images ``(N, H, W, C)``, maps ``(N, H, W, 1)``."""


class KernelSHAP(KerasMethod, _KernelSHAP):
    """Kernel SHAP for a Keras model; ``feature_mask`` channels last as for :class:`FeatureAblation`."""


__all__ = [
    "RISE",
    "FeatureAblation",
    "Gradient",
    "GradientSHAP",
    "InputXGradient",
    "IntegratedGradients",
    "KernelSHAP",
    "Occlusion",
    "SmoothGrad",
]
