"""The CAM family and the FullGrad family for Keras 3 models: the PyTorch classes over the Keras backend.

Each method is written once (:mod:`bbdecoder.attribution.cam`, :mod:`bbdecoder.attribution.fullgrad`);
the classes here put :class:`~bbdecoder.keras.front.KerasMethod` first, which gives them the Keras core
backend (:mod:`bbdecoder.backends.keras_core`: layouts, targets, the softmax head looked through), and
the Keras model gives them the Keras layer backend (:mod:`bbdecoder.backends.layers_keras`: layer
calls intercepted under a ``GradientTape``). Same constructors and calls as on PyTorch
(``GradCAM(model, layer=None)``, ``saliency(x, target)``, ``layer_map(x, target)``,
``FullGrad(model, im_size)``, ``checkCompleteness()``, ...), with Keras' layouts: inputs
``(N, *spatial, C)``, maps tf.Tensors ``(N, *spatial, 1)``, ``im_size`` channels last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bbdecoder.attribution import cam as _cam
from bbdecoder.attribution import fullgrad as _fullgrad
from bbdecoder.attribution import gradcam as _gradcam
from bbdecoder.attribution import smooth_fullgrad as _smooth_fullgrad
from bbdecoder.keras._backend import tf
from bbdecoder.keras.front import KerasMethod
from bbdecoder.keras.methods import SmoothGrad


class GradCAM(KerasMethod, _gradcam.GradCAM):
    """Grad-CAM for Keras 3 models: :class:`bbdecoder.GradCAM` over the Keras backend.

    Same constructor and calls (``GradCAM(model, layer=None, reshape=None)``, ``saliency(x, target)``,
    ``layer_map(x, target)``, ``layer_maps``, the pytorch-grad-cam call); inputs channels last
    ``(N, *spatial, C)``, maps tf.Tensors ``(N, *spatial, 1)``. ``layer``: a Keras layer of the model,
    its name, a glob over layer names, a leaf ID, a layer type, or a list of these; ``None``: the
    trunk's last feature map (the last layer call, in order of completion, with a spatial output; a
    nested block's output after its branches). ``reshape``: for token outputs ``(N, L, C)``
    (``tokens(prefix=1)``); channels-last maps need none.
    """


class GradCAMPlusPlus(KerasMethod, _cam.GradCAMPlusPlus):
    """Grad-CAM++ for Keras 3 models (:class:`bbdecoder.GradCAMPlusPlus`); as :class:`GradCAM`."""


class HiResCAM(KerasMethod, _cam.HiResCAM):
    """HiResCAM for Keras 3 models (:class:`bbdecoder.HiResCAM`); as :class:`GradCAM`."""


class XGradCAM(KerasMethod, _cam.XGradCAM):
    """XGrad-CAM for Keras 3 models (:class:`bbdecoder.XGradCAM`); as :class:`GradCAM`."""


class LayerCAM(KerasMethod, _cam.LayerCAM):
    """LayerCAM for Keras 3 models (:class:`bbdecoder.LayerCAM`); as :class:`GradCAM`."""


class EigenCAM(KerasMethod, _cam.EigenCAM):
    """EigenCAM for Keras 3 models (:class:`bbdecoder.EigenCAM`); as :class:`GradCAM`."""


class ScoreCAM(KerasMethod, _cam.ScoreCAM):
    """Score-CAM for Keras 3 models (:class:`bbdecoder.ScoreCAM`); as :class:`GradCAM`, plus
    ``batch_size`` and ``progress``."""


class AblationCAM(KerasMethod, _cam.AblationCAM):
    """Ablation-CAM for Keras 3 models (:class:`bbdecoder.AblationCAM`); as :class:`GradCAM`, plus
    ``batch_size``, ``ablation_value`` and ``progress``."""


@dataclass
class FullGradDecomposition:
    """The parts of F(x) for a batch, as tf.Tensors in the model's layout.

    Attributes:
        inputs: the model's inputs ``(N, *spatial, C)`` (after ``input_transform``).
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
    source: _fullgrad.FullGradDecomposition = field(repr=False)

    def totals(self) -> Any:
        """sum(x * dF/dx) + sum of all bias gradients, per sample (N,)."""
        return tf.constant(self.source.totals().detach().cpu().numpy())

    def relative_error(self) -> Any:
        """|totals - scores| / max(|scores|, |totals|), per sample (N,)."""
        return tf.constant(self.source.relative_error().detach().cpu().numpy())


class _KerasFullGradFamily(KerasMethod):
    def _native_decomposition(self, decomposition: _fullgrad.FullGradDecomposition) -> FullGradDecomposition:
        native = self.backend.to_framework  # type: ignore[attr-defined]  # channels last, a tf.Tensor
        return FullGradDecomposition(
            native(decomposition.inputs),
            native(decomposition.input_gradient),
            [native(g) for g in decomposition.bias_gradients],
            list(decomposition.layer_names),
            native(decomposition.scores),
            decomposition,
        )

    def _require_im_size(self) -> tuple[int, ...]:
        im_size: tuple[int, ...] | None = getattr(self, "im_size", None)
        if im_size is None:
            raise ValueError("no im_size: pass `im_size=(H, W, C)` to FullGrad or give `inputs` to check")
        return im_size


class FullGrad(_KerasFullGradFamily, _fullgrad.FullGrad):
    """FullGrad for Keras 3 models: :class:`bbdecoder.FullGrad` over the Keras backend.

    ``FullGrad(model, im_size=(224, 224, 3))`` (channels last) checks completeness on construction;
    ``saliency(x, target)`` -> tf.Tensor ``(N, *spatial, 1)``; ``decompose`` /
    ``fullGradientDecompose`` give tf.Tensors in the model's layout, bias gradients in call order.
    Conv*/Dense/BatchNormalization biases are read where they are added: before a fused
    ``activation=``, and inside a subclass whose ``call`` applies its activation after
    ``super().call`` (refused by name when its ``call`` never reaches the Keras layer's own).
    """


class SimpleFullGrad(_KerasFullGradFamily, _fullgrad.SimpleFullGrad):
    """Simple FullGrad for Keras 3 models: :class:`bbdecoder.SimpleFullGrad` over the Keras backend."""


class SmoothFullGrad(KerasMethod, _smooth_fullgrad.SmoothFullGrad):
    """SmoothFullGrad for Keras 3 models: :class:`bbdecoder.SmoothFullGrad` (SmoothGrad over Keras
    :class:`FullGrad`'s saliency); the same seed gives PyTorch's noise, transposed.
    ``saliency(inputs, target) -> tf.Tensor (N, *spatial, 1)``."""

    fullgrad_class = FullGrad
    _inner = staticmethod(SmoothGrad._inner)


CompletenessError = _fullgrad.CompletenessError

__all__ = [
    "AblationCAM",
    "CompletenessError",
    "EigenCAM",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "XGradCAM",
]
