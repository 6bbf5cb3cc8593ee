"""The CAM family and the FullGrad family for Keras 3 models: the PyTorch classes over the Keras backend.

Each method is written once (:mod:`bbdecoder.attribution.cam`, :mod:`bbdecoder.attribution.fullgrad`);
the classes here only swap the framework half of the constructor for
:class:`~bbdecoder.backends.layers_keras.KerasLayers`, which runs the model under a ``GradientTape``
with its layer calls intercepted. Same constructors and calls as on PyTorch
(``GradCAM(model, layer=None)``, ``saliency(x, target)``, ``layer_map(x, target)``,
``FullGrad(model, im_size)``, ``checkCompleteness()``, ...), with Keras' layouts: inputs
``(N, *spatial, C)``, maps tf.Tensors ``(N, *spatial, 1)``, ``im_size`` channels last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bbdecoder.attribution import cam as _cam
from bbdecoder.attribution import fullgrad as _fullgrad
from bbdecoder.attribution import gradcam as _gradcam
from bbdecoder.attribution.outputs import check_scores_from
from bbdecoder.backends.layers_keras import KerasLayers, channels_last, to_tf
from bbdecoder.keras.base import KerasExplainer
from bbdecoder.keras.layers import check_model
from bbdecoder.keras.smoothgrad import SmoothGrad


class KerasLayerMethod:
    """The framework half of a layer method for a Keras model (put first among the bases).

    ``eval_mode``: Keras models are always explained in inference mode (``training=False``); only
    ``True`` is accepted. ``input_transform`` is a function on channels-last inputs.
    """

    def _init_framework(
        self, model: Any, *, input_transform: Any = None, eval_mode: bool = True, scores_from: str = "logits"
    ) -> None:
        if eval_mode is not True:
            raise ValueError(
                "Keras models are explained in inference mode (training=False: BatchNormalization's "
                "moving statistics, no dropout); eval_mode=False is not supported on Keras"
            )
        self.model = check_model(model)
        self.input_transform = input_transform
        self.eval_mode = True
        self.scores_from = check_scores_from(scores_from)
        self.attribution_layer = None
        self.layer_backend = KerasLayers(self)

    # The Keras explainer's model calls (used by SmoothGrad around these methods).
    forward = KerasExplainer.forward
    scores = KerasExplainer.scores
    freeze_target = KerasExplainer.freeze_target
    input_gradient = KerasExplainer.input_gradient


def _keras_doc(cls: type) -> str:
    return (
        f"{cls.__name__} for Keras 3 models: :class:`bbdecoder.{cls.__name__}` over the Keras backend.\n\n"
        "    Same constructor and calls; inputs channels last ``(N, *spatial, C)``, maps tf.Tensors\n"
        "    ``(N, *spatial, 1)``; ``layer`` is a Keras layer, its name, a glob, a leaf ID, a layer type\n"
        "    or a list of these (default: the trunk's last feature map).\n"
    )


class GradCAM(KerasLayerMethod, _gradcam.GradCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_gradcam.GradCAM)


class GradCAMPlusPlus(KerasLayerMethod, _cam.GradCAMPlusPlus, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.GradCAMPlusPlus)


class HiResCAM(KerasLayerMethod, _cam.HiResCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.HiResCAM)


class XGradCAM(KerasLayerMethod, _cam.XGradCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.XGradCAM)


class LayerCAM(KerasLayerMethod, _cam.LayerCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.LayerCAM)


class EigenCAM(KerasLayerMethod, _cam.EigenCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.EigenCAM)


class ScoreCAM(KerasLayerMethod, _cam.ScoreCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.ScoreCAM)


class AblationCAM(KerasLayerMethod, _cam.AblationCAM, KerasExplainer):  # type: ignore[misc]
    __doc__ = _keras_doc(_cam.AblationCAM)


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
        return to_tf(self.source.totals())

    def relative_error(self) -> Any:
        """|totals - scores| / max(|scores|, |totals|), per sample (N,)."""
        return to_tf(self.source.relative_error())


class _KerasFullGradFamily(KerasLayerMethod):
    def _native_decomposition(self, decomposition: _fullgrad.FullGradDecomposition) -> FullGradDecomposition:
        return FullGradDecomposition(
            to_tf(channels_last(decomposition.inputs)),
            to_tf(channels_last(decomposition.input_gradient)),
            [to_tf(channels_last(g)) for g in decomposition.bias_gradients],
            list(decomposition.layer_names),
            to_tf(decomposition.scores),
            decomposition,
        )

    def _require_im_size(self) -> tuple[int, ...]:
        im_size: tuple[int, ...] | None = getattr(self, "im_size", None)
        if im_size is None:
            raise ValueError("no im_size: pass `im_size=(H, W, C)` to FullGrad or give `inputs` to check")
        return im_size


class FullGrad(_KerasFullGradFamily, _fullgrad.FullGrad, KerasExplainer):  # type: ignore[misc]
    """FullGrad for Keras 3 models: :class:`bbdecoder.FullGrad` over the Keras backend.

    ``FullGrad(model, im_size=(224, 224, 3))`` (channels last) checks completeness on construction;
    ``saliency(x, target)`` -> tf.Tensor ``(N, *spatial, 1)``; ``decompose`` /
    ``fullGradientDecompose`` give tf.Tensors in the model's layout, bias gradients in call order.
    Conv*/Dense/BatchNormalization biases are read where they are added: before a fused
    ``activation=``, and inside a subclass whose ``call`` applies its activation after
    ``super().call`` (refused by name when its ``call`` never reaches the Keras layer's own).
    """


class SimpleFullGrad(_KerasFullGradFamily, _fullgrad.SimpleFullGrad, KerasExplainer):  # type: ignore[misc]
    """Simple FullGrad for Keras 3 models: :class:`bbdecoder.SimpleFullGrad` over the Keras backend."""


class SmoothFullGrad(SmoothGrad):
    """``SmoothGrad`` over Keras :class:`FullGrad`'s saliency (the reference's "smooth" variant).

    ``saliency(inputs, target) -> tf.Tensor (N, *spatial, 1)``: the mean of FullGrad maps of
    ``n_samples`` noisy copies (noise sigma = ``noise_level`` x each sample's value range; the same
    seed gives PyTorch's noise, transposed). Completeness is checked once, on the clean model.
    """

    def __init__(
        self,
        model: Any,
        im_size: Sequence[int] | None = None,
        *,
        n_samples: int = 25,
        noise_level: float = 0.15,
        seed: int = 0,
        input_transform: Any = None,
        internal_batch_size: int | None = None,
        check: bool = True,
    ) -> None:
        fullgrad = FullGrad(model, im_size, input_transform=input_transform, check=check)
        super().__init__(
            fullgrad,
            n_samples=n_samples,
            noise_level=noise_level,
            seed=seed,
            internal_batch_size=internal_batch_size,
        )
        self.fullgrad = fullgrad


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
    "KerasLayerMethod",
    "LayerCAM",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "XGradCAM",
]
