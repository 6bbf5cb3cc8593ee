"""FullGrad (Srinivas & Fleuret, NeurIPS 2019) and Simple FullGrad.

The full-gradient decomposition of a piecewise-linear network with biases is exact:

    F(x) = sum(x * dF/dx) + sum over bias layers l of sum(dF/d output_l * b_l)

FullGrad's saliency aggregates both parts: ``psi(|x * dF/dx|)`` plus, for every layer with a spatial
output, the upsampled ``psi(|bias-gradient_l|)``, each summed over channels (``psi`` = per-sample
min-max over (C, *spatial) jointly). Bias layers are matched to their gradients *by module* through
tensor hooks attached to each call's output, so execution order, unused modules and modules called
twice are all handled, and in-place activations after a layer do not corrupt its gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer, InputTransform
from bbdecoder.attribution.bias_layers import UnreachableBiasError
from bbdecoder.attribution.postprocess import channel_sum_minmax, resize_to
from bbdecoder.backends.layers_base import LayerBackend, resolve_layer_backend
from bbdecoder.targets import PerSampleTargets, TargetError, TargetLike

LayerGradHandler = Callable[[str, torch.Tensor, torch.Tensor], None]
"""Called during backward with (layer name, broadcast bias, dF/d output) for each bias-layer call."""


class CompletenessError(AssertionError):
    """The full-gradient decomposition does not add up to the model's output.

    ``rel_error`` is the worst relative error seen, ``tolerance`` the bound it broke.
    """

    def __init__(self, rel_error: float, tolerance: float, detail: str = "") -> None:
        self.rel_error = rel_error
        self.tolerance = tolerance
        message = (
            f"FullGrad completeness check failed: the decomposition sum(x * dF/dx) + sum(bias-gradients) "
            f"differs from the model's output by a relative error of {rel_error:.3e} (tolerance "
            f"{tolerance:.1e}). The model has constants that are not biases of Conv/Linear/BatchNorm "
            "layers (saturating activations such as ReLU6, LayerNorm, GELU, attention, BatchNorm in train "
            "mode, custom bias parameters), so FullGrad's decomposition does not hold for it. Use "
            "`SimpleFullGrad(model)`, which needs no completeness, or pass `check=False` to accept an "
            "inexact decomposition."
        )
        super().__init__(message + (f" {detail}" if detail else ""))


_CONSTANT_KINDS: tuple[tuple[str, tuple[type[nn.Module], ...], tuple[str, ...]], ...] = (
    ("LayerNorm", (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm), ("LayerNorm", "RMSNorm", "GroupNorm")),
    ("GELU", (nn.GELU,), ("GELU",)),
    ("attention/softmax", (nn.MultiheadAttention, nn.Softmax), ("Attention", "Softmax")),
    ("ReLU6", (nn.ReLU6, nn.Hardtanh), ("ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid")),
)


_KERAS_ACTIVATIONS = {"gelu": "GELU", "softmax": "attention/softmax", "relu6": "ReLU6", "hard_swish": "ReLU6"}


def non_bias_constants(model: Any) -> list[str]:
    """The kinds of layer in ``model`` whose constants are not Conv/Linear/BatchNorm biases, by
    module type: ``LayerNorm`` (also RMSNorm, GroupNorm), ``GELU``, ``attention/softmax``, ``ReLU6``.

    A Keras model's layers are matched by type name and by their ``activation=``."""
    if isinstance(model, nn.Module):
        modules: list[Any] = list(model.modules())
    else:
        flatten = getattr(model, "_flatten_layers", None)
        modules = list(flatten(include_self=True, recursive=True)) if callable(flatten) else []
    found: list[str] = []
    for label, types, names in _CONSTANT_KINDS:
        for module in modules:
            type_name = type(module).__name__
            if isinstance(module, types) or any(n.lower() in type_name.lower() for n in names):
                found.append(label)
                break
            activation = getattr(getattr(module, "activation", None), "__name__", "")
            if _KERAS_ACTIVATIONS.get(activation) == label:
                found.append(label)
                break
    return found


def non_bias_constants_detail(model: Any) -> str:
    """The sentence naming :func:`non_bias_constants` for :class:`CompletenessError`, or ``""``."""
    found = non_bias_constants(model)
    if not found:
        return ""
    return (
        f"This model has {', '.join(found)} layers, whose constants are not biases: explain it with "
        "`SimpleFullGrad(model)` (or GradCAM, the rollouts)."
    )


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the completeness check: 1e-4 in float32 (the reference's), 1e-8 in float64."""
    return 1e-8 if dtype == torch.float64 else 1e-4


@dataclass
class FullGradDecomposition:
    """The parts of F(x) for a batch.

    Attributes:
        inputs: the model's inputs (N, C, *spatial) (after ``input_transform``).
        input_gradient: dF/dx, shaped like ``inputs``.
        bias_gradients: one tensor per bias-layer *call*, in backward order, each shaped like that
            call's output: ``dF/d output * b`` with b broadcast over the non-channel dims.
        layer_names: the qualified name of the module behind each bias gradient.
        scores: F(x), the target scores (N,).
    """

    inputs: torch.Tensor
    input_gradient: torch.Tensor
    bias_gradients: list[torch.Tensor]
    layer_names: list[str]
    scores: torch.Tensor

    def totals(self) -> torch.Tensor:
        """sum(x * dF/dx) + sum of all bias gradients, per sample (N,)."""
        total = (self.inputs * self.input_gradient).flatten(1).sum(1)
        for bias_gradient in self.bias_gradients:
            total = total + bias_gradient.flatten(1).sum(1)
        return total

    def relative_error(self) -> torch.Tensor:
        """|totals - scores| / max(|scores|, |totals|), per sample (N,)."""
        return relative_error(self.totals(), self.scores)


def relative_error(totals: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    scale = torch.maximum(totals.abs(), scores.abs()).clamp_min(torch.finfo(scores.dtype).tiny)
    return (totals - scores).abs() / scale


class _FullGradFamily(Explainer):
    """Runs one forward+backward through the layer backend, handing each bias-layer call's output
    gradient to a handler (channel-first torch tensors on either framework)."""

    def __init__(
        self,
        model: Any,
        *,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        scores_from: str = "logits",
    ) -> None:
        super().__init__(model, input_transform=input_transform, eval_mode=eval_mode, scores_from=scores_from)
        self.layer_backend: LayerBackend = resolve_layer_backend(self, self.model)
        self.bias_layers = [(ref.name, ref.layer) for ref in self.layer_backend.bias_layers()]

    def _model_input(self, inputs: torch.Tensor) -> torch.Tensor:
        # The decomposition lives in the model's input space: a normalisation's constant offset is not
        # a bias of any layer, so the transform is applied outside the differentiated graph.
        return self.layer_backend.model_input(inputs)

    # SimpleFullGrad needs no exact bias: where a fused layer's biased tensor cannot be found it falls
    # back to the layer's output. FullGrad refuses such a layer by name.
    _strict_bias_location = True

    def _backward_through_layers(
        self, inputs: torch.Tensor, target: TargetLike, handler: LayerGradHandler
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(model input, dF/d input, scores), calling ``handler`` for every bias-layer call.

        ``inputs`` is a checked channel-first batch (see :meth:`_checked`).
        """
        x = self._model_input(inputs).detach()
        input_gradient, scores = self.layer_backend.backward_through_biases(
            x, target, handler, strict=self._strict_bias_location
        )
        return x, input_gradient, scores

    def _checked(self, inputs: Any) -> torch.Tensor:
        """The user's batch, validated, as a channel-first torch tensor."""
        return self.layer_backend.check_inputs(inputs, 3)

    def _aggregate(
        self, inputs: torch.Tensor, target: TargetLike, *, use_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Saliency (N, 1, *spatial), per-sample totals of the decomposition, and the scores.

        ``use_bias``: each layer contributes its bias-gradient ``dF/d output * b`` (FullGrad), else
        its plain output gradient (Simple FullGrad; the totals are then meaningless). Each layer's
        gradient is reduced to one channel-summed map inside its gradient hook, so no layer gradient
        outlives its step of the backward pass and memory stays that of a plain backward. Maps of
        one resolution are summed before a single resize: bilinear resizing is linear, so this is the
        same map with one resize per resolution instead of one per layer.
        """
        spatial = tuple(inputs.shape[2:])
        by_resolution: dict[tuple[int, ...], torch.Tensor] = {}
        bias_total: list[torch.Tensor] = []

        def handler(_name: str, bias: torch.Tensor, grad: torch.Tensor) -> None:
            values = grad * bias if use_bias else grad
            if use_bias:
                bias_total.append(values.flatten(1).sum(1))
            if grad.dim() != len(spatial) + 2:
                return
            reduced = channel_sum_minmax(values)
            resolution = tuple(reduced.shape[2:])
            previous = by_resolution.get(resolution)
            by_resolution[resolution] = reduced if previous is None else previous + reduced

        x, input_gradient, scores = self._backward_through_layers(inputs, target, handler)
        input_part = x * input_gradient
        result = channel_sum_minmax(input_part)
        for summed in by_resolution.values():
            result = result + resize_to(summed, spatial, align_corners=True)
        totals = input_part.flatten(1).sum(1)
        for part in bias_total:
            totals = totals + part
        return result, totals, scores


class FullGrad(_FullGradFamily):
    """FullGrad saliency with the reference interface.

    Args:
        model: a piecewise-linear network with biases (Conv/Linear/BatchNorm, ReLU, pooling, residual
            adds, concatenation). Never modified.
        im_size: one sample's shape without the batch dimension, e.g. ``(3, 224, 224)``. When given,
            completeness is checked at construction on a random input; otherwise at the first call,
            on a random input shaped like that call's samples.
        input_transform: applied before the model (e.g. ``Normalize``); the decomposition and the map
            are then of the *transformed* input, as in the reference (it works on normalised images).
        eval_mode: evaluate in eval mode (BatchNorm's running statistics) and restore modes after.
        scores_from: ``"logits"`` (default) explains the logits beneath a final softmax/sigmoid
            module (the decomposition is exact for them); see :class:`~bbdecoder.attribution.Explainer`.
        check: run the completeness check (raises :class:`CompletenessError`). ``check=False`` means
            *you accept an inexact decomposition*: maps are computed whatever the error, and the
            per-sample relative completeness error of every ``saliency`` call is still left in
            ``last_relative_error`` (N,) for you to look at.

    Bias layers with their own ``forward`` (timm's ``BatchNormAct2d``, a ``BatchNorm2d`` subclass that
    also applies drop and activation children) are read where the bias is added: the tensor that
    ``F.batch_norm`` (or ``F.conv*d`` / ``F.linear``) returned inside the forward, before the
    activation. A layer whose forward never makes such a call is refused by name with
    :class:`~bbdecoder.attribution.bias_layers.UnreachableBiasError`, with or without ``check``.

    >>> fullgrad = FullGrad(model, im_size=(3, 224, 224))
    >>> saliency = fullgrad.saliency(x, target)            # (N, 1, 224, 224)
    >>> input_grad, bias_grads = fullgrad.fullGradientDecompose(x, target)
    """

    def __init__(
        self,
        model: Any,
        im_size: Sequence[int] | None = None,
        *,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        check: bool = True,
        scores_from: str = "logits",
    ) -> None:
        super().__init__(model, input_transform=input_transform, eval_mode=eval_mode, scores_from=scores_from)
        self.im_size = tuple(int(s) for s in im_size) if im_size is not None else None
        self.check = check
        self._checked_shapes: set[tuple[int, ...]] = set()
        self.last_relative_error: Any = None
        if check and self.im_size is not None:
            # An output that needs a target (a callable, a tuple without logits) is checked at the
            # first call instead, with that call's target.
            with contextlib.suppress(TargetError):
                self.checkCompleteness()

    # -- decomposition ---------------------------------------------------------------------------
    def decompose(self, inputs: Any, target: TargetLike = None) -> FullGradDecomposition:
        """The full-gradient decomposition of the target scores of ``inputs`` (N, C, *spatial).

        On Keras the inputs are channels last and the decomposition's tensors are tf.Tensors in the
        model's own layout.
        """
        return self._native_decomposition(self._decompose(self._check_batch(inputs), target))

    def _decompose(self, x: torch.Tensor, target: TargetLike) -> FullGradDecomposition:
        gradients: list[torch.Tensor] = []
        names: list[str] = []

        def keep(name: str, bias: torch.Tensor, grad: torch.Tensor) -> None:
            gradients.append(grad * bias)
            names.append(name)

        model_x, input_gradient, scores = self._backward_through_layers(x, target, keep)
        return FullGradDecomposition(model_x, input_gradient, gradients, names, scores)

    def _native_decomposition(self, decomposition: FullGradDecomposition) -> Any:
        """The decomposition in the framework's own tensors (PyTorch: as it is)."""
        return decomposition

    def fullGradientDecompose(self, image: Any, target_class: TargetLike = None) -> tuple[Any, list[Any]]:
        """(input gradient shaped like ``image``, list of bias gradients shaped like each layer's output)."""
        decomposition = self.decompose(image, target_class)
        return decomposition.input_gradient, decomposition.bias_gradients

    full_gradient_decompose = fullGradientDecompose

    # -- completeness ----------------------------------------------------------------------------
    def checkCompleteness(
        self,
        inputs: Any = None,
        *,
        target: TargetLike = None,
        tolerance: float | None = None,
        seed: int = 0,
    ) -> float:
        """Check sum(decomposition) == F(x); returns the worst relative error.

        On ``inputs``, or on a seeded standard-normal input of shape ``(1, *im_size)`` (``(N, *im_size)``
        when ``target`` is a per-sample sequence of length N). ``target`` is as everywhere: give the
        callable you explain with when the output needs one (a segmentation map, a ``ModelOutput``
        without ``logits``). Raises :class:`CompletenessError` above ``tolerance`` (default 1e-4 in
        float32, 1e-8 in float64).
        """
        if inputs is None:
            sample = self.layer_backend.sample_shape(self._require_im_size())
            x = self._random_input(sample, seed, batch=_target_batch(target))
        else:
            x = self._check_batch(inputs)
        return self._check_completeness(x, target, tolerance)

    check_completeness = checkCompleteness

    def _check_completeness(self, x: torch.Tensor, target: TargetLike, tolerance: float | None) -> float:
        decomposition = self._decompose(x, target)
        worst = float(decomposition.relative_error().max())
        # float64 inputs to a float32 model (Keras casts them) are checked at the model's precision
        dtype = x.dtype if decomposition.scores.dtype == torch.float64 else decomposition.scores.dtype
        bound = default_tolerance(dtype) if tolerance is None else tolerance
        if not worst <= bound:  # also catches NaN
            raise CompletenessError(worst, bound, non_bias_constants_detail(self.model))
        self._checked_shapes.add(tuple(x.shape[1:]))
        return worst

    # -- saliency --------------------------------------------------------------------------------
    def saliency(
        self,
        inputs: Any,
        target: TargetLike = None,
        *,
        target_class: TargetLike = None,
        **kwargs: Any,
    ) -> Any:
        """FullGrad saliency, non-negative, shape (N, 1, *spatial) at input resolution.

        (Keras: a tf.Tensor ``(N, *spatial, 1)``.) ``target_class`` is accepted as the reference's
        name for ``target``. The per-sample relative completeness error of this very batch is left in
        ``last_relative_error`` (N,) at no extra cost.
        """
        target = target_class if target is None else target
        x = self._check_batch(inputs)
        if self.check and tuple(x.shape[1:]) not in self._checked_shapes:
            # A callable or per-sample target may assume this call's batch size: the probe has it too.
            batch = 1 if target is None or isinstance(target, int) else x.shape[0]
            probe = self._random_input(tuple(x.shape[1:]), 0, like=x, batch=batch)
            self._check_completeness(probe, target, None)
        result, totals, scores = self._aggregate(x, target, use_bias=True)
        self.last_relative_error = self.layer_backend.to_native_map(relative_error(totals, scores))
        return self.layer_backend.to_native_map(result)

    def attribute(self, inputs: Any, target: TargetLike = None, **kwargs: Any) -> Any:
        """The input part of the decomposition, ``x * dF/dx``, shaped like ``inputs``."""
        decomposition = self._decompose(self._check_batch(inputs), target)
        return self.layer_backend.to_native_map(decomposition.inputs * decomposition.input_gradient)

    # -- helpers ---------------------------------------------------------------------------------
    def _require_im_size(self) -> tuple[int, ...]:
        if self.im_size is None:
            raise ValueError("no im_size: pass `im_size=(C, H, W)` to FullGrad or give `inputs` to check")
        return self.im_size

    def _check_batch(self, inputs: Any) -> torch.Tensor:
        """The checked channel-first batch; one sample without its batch dimension is refused."""
        x = self._checked(inputs)
        if self.im_size is not None and tuple(int(s) for s in inputs.shape) == self.im_size:
            fix = "x.unsqueeze(0)" if self.layer_backend.framework == "torch" else "x[None]"
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} look like one sample without its batch dimension "
                f"(im_size={self.im_size}); use {fix}"
            )
        return x

    def _random_input(
        self, sample_shape: tuple[int, ...], seed: int, like: torch.Tensor | None = None, batch: int = 1
    ) -> torch.Tensor:
        """A seeded standard-normal batch ``(batch, *sample_shape)`` (channel-first) in the model's dtype."""
        reference = like if like is not None else self.layer_backend.reference_tensor()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        sample = torch.randn((batch, *sample_shape), generator=generator, dtype=torch.float64)
        return sample.to(device=reference.device, dtype=reference.dtype)


def _target_batch(target: TargetLike) -> int:
    """Samples a random check input needs for ``target``: N for a per-sample sequence, else 1."""
    if target is None or isinstance(target, int):
        return 1
    if isinstance(target, PerSampleTargets):
        return len(target)
    if callable(target) and not isinstance(target, torch.Tensor):
        return 1
    classes = torch.as_tensor(target)
    return int(classes.shape[0]) if classes.dim() == 1 else 1


class SimpleFullGrad(_FullGradFamily):
    """Simple FullGrad: FullGrad's aggregation with ``|dF/d output_l|`` in place of the bias-gradient.

    Needs no completeness, so it works on any network (LayerNorm, GELU, attention, ReLU6). A fused
    layer whose pre-activation tensor cannot be found contributes the gradient at its output.
    """

    _strict_bias_location = False

    def saliency(
        self,
        inputs: Any,
        target: TargetLike = None,
        *,
        target_class: TargetLike = None,
        **kwargs: Any,
    ) -> Any:
        """Non-negative map (N, 1, *spatial) at input resolution (Keras: ``(N, *spatial, 1)``)."""
        target = target_class if target is None else target
        result, _, _ = self._aggregate(self._checked(inputs), target, use_bias=False)
        return self.layer_backend.to_native_map(result)

    def attribute(self, inputs: Any, target: TargetLike = None, **kwargs: Any) -> Any:
        """``x * dF/dx`` shaped like ``inputs`` (the input part of the map)."""
        x, input_gradient, _ = self._backward_through_layers(self._checked(inputs), target, lambda *_: None)
        return self.layer_backend.to_native_map(x * input_gradient)


__all__ = [
    "CompletenessError",
    "FullGrad",
    "FullGradDecomposition",
    "SimpleFullGrad",
    "UnreachableBiasError",
    "default_tolerance",
]
