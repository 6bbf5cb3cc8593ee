"""The template of every CAM: layers, targets, reshape, resizing, per-image min-max.

A method is a small subclass that overrides one step (pytorch-grad-cam's template method):

* :meth:`BaseCAM.cam_weights` -- one weight per channel from the activations and gradients
  (Grad-CAM, Grad-CAM++, XGradCAM, ScoreCAM, AblationCAM); the map is then ``sum_c w_c A_c``;
* or :meth:`BaseCAM.cam_image` -- the whole map (HiResCAM, LayerCAM, EigenCAM).

The base then applies ReLU; :meth:`BaseCAM.saliency` resizes to the input and min-max scales per image.
Every step is torch code on channel-first tensors; what touches the model (hooks on PyTorch, calls
intercepted under a ``GradientTape`` on Keras) is the layer backend's
(:mod:`bbdecoder.backends.layers_base`), so each method is written once for both frameworks.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bbdecoder.attribution.base import Explainer, InputTransform
from bbdecoder.attribution.cam.reshape import ReshapeLike, resolve_reshape
from bbdecoder.attribution.postprocess import minmax_per_sample, resize_to
from bbdecoder.backends.layers_base import LayerBackend, LayerRef, Replacement, resolve_layer_backend
from bbdecoder.layers import LayerSelection
from bbdecoder.targets import TargetLike


@dataclass
class LayerRecord:
    """What one forward(+backward) saw at one layer (its last call), in channel-first layout.

    ``activation`` and ``gradient`` are ``(N, C, *spatial)`` torch tensors after ``reshape``; ``raw`` is
    the layer's output as the model produced it, in the layer's own layout (channels last for a Keras
    conv map; kept for methods that replace it, such as AblationCAM). ``module`` is the layer object
    (an ``nn.Module`` or a Keras layer).
    """

    name: str
    module: Any
    activation: torch.Tensor
    gradient: torch.Tensor | None
    raw: torch.Tensor
    calls: int


@dataclass
class CAMContext:
    """Everything a step may need besides the activations: the batch, its frozen target, the layer.

    ``inputs`` is the batch as a channel-first torch tensor ``(N, C, *spatial)`` on either framework.
    """

    inputs: torch.Tensor
    target: TargetLike
    record: LayerRecord
    explainer: BaseCAM


class BaseCAM(Explainer):
    """Class activation maps on one or several layers.

    Args:
        model: the classifier (never modified: hooks removed, modes and ``requires_grad`` restored).
        layer: where the map is taken: a module (leaf or not: a block, a stage), any module's
            qualified name (``"layer4"``, ``"stages.3.blocks.2"``), a glob over module names, a leaf
            ID (``int``, as ``bbdecoder layers`` numbers them), a module type, or a list of these. With
            several layers, each layer's map is min-max scaled, resized to the input and the maps are
            averaged (as pytorch-grad-cam does). ``None``: the last module, in execution order, whose
            output is a feature map of the trunk (see :meth:`default_layers`).
        reshape: turns the layer's output into ``(N, C, *spatial)``: ``None`` (already channel-first),
            ``"channels_last"``, ``"tokens"`` / ``tokens(prefix=1)`` (a ViT with a class token), or a
            callable (pytorch-grad-cam's ``reshape_transform``).
        target_layers: pytorch-grad-cam's name for ``layer`` (a list of modules); give one of the two.
        reshape_transform: pytorch-grad-cam's name for ``reshape``.
        input_transform: as for every explainer.
        eval_mode: as for every explainer.

    A module that runs several times in one forward pass (a shared ReLU) contributes its last call.
    """

    uses_gradients: ClassVar[bool] = True
    method_name: ClassVar[str] = "CAM"

    def __init__(
        self,
        model: Any,
        layer: LayerSelection = None,
        reshape: ReshapeLike = None,
        *,
        target_layers: LayerSelection = None,
        reshape_transform: ReshapeLike = None,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, input_transform=input_transform, eval_mode=eval_mode)
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            # torch.compile: hooks added after compilation are not seen by the compiled graph, so the
            # maps are taken on the eager modules (same weights, same outputs).
            self.model = inner
        self.layer_backend: LayerBackend = resolve_layer_backend(self, self.model)
        if layer is not None and target_layers is not None:
            raise TypeError("give `layer=` or `target_layers=` (its pytorch-grad-cam name), not both")
        if reshape is not None and reshape_transform is not None:
            raise TypeError("give `reshape=` or `reshape_transform=` (its pytorch-grad-cam name), not both")
        layer = layer if layer is not None else target_layers
        self.reshape = reshape if reshape is not None else reshape_transform
        self._reshape = resolve_reshape(self.reshape)
        self._layers: list[tuple[str, Any]] | None = None
        if layer is not None:
            if isinstance(layer, Sequence) and not isinstance(layer, str) and len(layer) == 0:
                raise ValueError("`layer` is an empty list; give at least one layer, or None for the default")
            self._layers = [(ref.name, ref.layer) for ref in self.layer_backend.find_layers(layer)]

    # -- layers ----------------------------------------------------------------------------------
    @property
    def layer(self) -> Any:
        """The (first) layer, or ``None`` while the default has not been chosen by a first call."""
        return self._layers[0][1] if self._layers else None

    @property
    def layers(self) -> list[Any]:
        """Every layer whose map is used (empty while the default has not been chosen)."""
        return [module for _, module in self._layers or []]

    @property
    def layer_names(self) -> list[str]:
        """The qualified names of :attr:`layers` (``""`` is the model itself)."""
        return [name for name, _ in self._layers or []]

    def default_layers(self, inputs: torch.Tensor) -> list[tuple[str, Any]]:
        """The default layer for ``inputs``: the trunk's last feature map, as ``[(name, module)]``.

        One probe forward (no gradients) on the first sample records every module's output. The
        chosen tensor is the last one, in execution order, that is a spatial map (after ``reshape``:
        the input's number of dims, more than one position), from any module but the model itself;
        a block's output comes after its residual branch, so branches are never chosen. Of the
        modules that output that same tensor (a stage, its last block, the block's last activation)
        the innermost is named, skipping pass-through modules such as ``nn.Identity``.

        A vision transformer (a declared patch size: timm's ``patch_embed.patch_size``, a Hugging
        Face ``config.patch_size``; token outputs ``(N, prefix + h * w, C)`` on the patch grid) gets
        the input of the last block's first norm, i.e. the previous block's output (the last block's
        own output reaches the head only through the class token, so its patch gradients are zero),
        and, without a user ``reshape``, ``tokens(prefix)`` with ``prefix = tokens - h * w``.
        ``inputs`` is channel-first (``(N, C, *spatial)``) on either framework.
        """
        return [(ref.name, ref.layer) for ref in self.layer_backend.default_layers(self, inputs)]

    def _resolved_layers(self, inputs: torch.Tensor) -> list[tuple[str, Any]]:
        if self._layers is None:
            self._layers = self.default_layers(inputs)
        return self._layers

    # -- the steps a method overrides ------------------------------------------------------------
    def cam_weights(
        self, ctx: CAMContext, activations: torch.Tensor, gradients: torch.Tensor | None
    ) -> torch.Tensor:
        """One weight per sample and channel, ``(N, C)``."""
        raise NotImplementedError(f"{type(self).__name__} must override cam_weights or cam_image")

    def cam_image(self, ctx: CAMContext) -> torch.Tensor:
        """The map before ReLU, ``(N, *spatial)``: ``sum_c w_c A_c`` with ``w = cam_weights(...)``."""
        activation = ctx.record.activation
        weights = self.cam_weights(ctx, activation, ctx.record.gradient)
        shape = weights.shape + (1,) * (activation.dim() - 2)
        return (weights.view(shape) * activation).sum(dim=1)

    # -- the public interface --------------------------------------------------------------------
    def layer_maps(self, inputs: Any, target: TargetLike = None) -> list[Any]:
        """One raw map per layer, each ``(N, 1, *layer_spatial)``, non-negative (ReLU applied).

        On Keras: tf.Tensors ``(N, *layer_spatial, 1)``.
        """
        x = self.layer_backend.check_inputs(inputs, 3)
        return [self.layer_backend.to_native_map(m) for m in self._layer_maps(x, target)]

    def _layer_maps(self, inputs: torch.Tensor, target: TargetLike) -> list[torch.Tensor]:
        records, frozen = self.record(inputs, target)
        maps = []
        for record in records:
            cam = self.cam_image(CAMContext(inputs, frozen, record, self))
            maps.append(torch.relu(cam).unsqueeze(1))
        return maps

    def layer_map(self, inputs: Any, target: TargetLike = None) -> Any:
        """The raw map ``(N, 1, *layer_spatial)`` at the layer's resolution, non-negative.

        On Keras: a tf.Tensor ``(N, *layer_spatial, 1)``. With several layers use :meth:`layer_maps`
        (their resolutions may differ) or :meth:`saliency`.
        """
        maps = self.layer_maps(inputs, target)
        if len(maps) != 1:
            raise ValueError(
                f"layer_map needs one layer, this {type(self).__name__} has {len(maps)} "
                f"({', '.join(map(repr, self.layer_names))}); use layer_maps() or saliency()"
            )
        return maps[0]

    def saliency(self, inputs: Any, target: TargetLike = None, **kwargs: Any) -> Any:
        """The map ``(N, 1, *spatial)`` at input resolution, min-max scaled to [0, 1] per image.

        On Keras: a tf.Tensor ``(N, *spatial, 1)``. Each layer's map is resized bilinearly
        (``align_corners=False``, like an image resize); with several layers each is min-max scaled per
        image first and the maps are averaged.
        """
        if kwargs:
            raise TypeError(
                f"{type(self).__name__}.saliency() got unexpected keyword arguments {sorted(kwargs)}; "
                "it takes (inputs, target)"
            )
        x = self.layer_backend.check_inputs(inputs, 3)
        return self.layer_backend.to_native_map(self.saliency_channel_first(x, target))

    def __call__(  # type: ignore[override]
        self,
        input_tensor: Any,
        targets: TargetLike = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """pytorch-grad-cam's call: ``cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ...])``.

        Returns the maps of :meth:`saliency` as a float32 numpy array ``(N, *spatial)`` (no channel
        dim), resized to the input and min-max scaled to [0, 1] per image, as pytorch-grad-cam returns
        them. ``targets``: anything :mod:`bbdecoder.targets` takes, including one target object per
        sample (each called on its sample's output row) and ``None`` for the arg-max classes.
        ``aug_smooth`` / ``eigen_smooth`` are not implemented and must stay ``False``.
        """
        if aug_smooth or eigen_smooth:
            raise ValueError(
                "aug_smooth and eigen_smooth are pytorch-grad-cam options that are not implemented here; "
                "leave them False (EigenCAM gives the first principal component of the activations)"
            )
        x = self.layer_backend.check_inputs(input_tensor, 3)
        maps = self.saliency_channel_first(x, targets)
        return maps[:, 0].detach().cpu().numpy().astype(np.float32)

    def saliency_channel_first(self, inputs: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """:meth:`saliency` of a channel-first torch batch, as a torch tensor ``(N, 1, *spatial)``."""
        size = tuple(inputs.shape[2:])
        maps = self._layer_maps(inputs, target)
        if len(maps) == 1:
            return minmax_per_sample(resize_to(maps[0], size, align_corners=False))
        resized = [resize_to(minmax_per_sample(m), size, align_corners=False) for m in maps]
        return minmax_per_sample(torch.stack(resized).mean(dim=0))

    # -- machinery -------------------------------------------------------------------------------
    def to_channel_first(self, name: str, tensor: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """A layer's output (or its gradient) in ``(N, C, *spatial)`` layout, or a clear error.

        ``tensor`` is in the layer's own layout; ``inputs`` is the channel-first batch. Without a
        ``reshape`` the backend's own layout conversion applies (Keras: channels last to first).
        """
        shape = tuple(tensor.shape)
        spatial = tuple(inputs.shape[2:])
        if self._reshape is not None:
            try:
                tensor = self._reshape(tensor, spatial)
            except Exception as err:
                raise ValueError(
                    f"reshape= failed on the output of layer {name or '(root)'!r}, shape {shape}: {err}"
                ) from err
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"reshape= must return a tensor, got {type(tensor).__name__}")
        else:
            tensor = self.layer_backend.native_to_channel_first(tensor, inputs.dim())
        if tensor.dim() != inputs.dim() or tensor.shape[0] != inputs.shape[0]:
            hint = (
                "pass reshape='channels_last' for (N, H, W, C) outputs, reshape=tokens(prefix=...) for "
                "token sequences (N, L, C), or a callable returning (N, C, H, W)"
            )
            got = f"after reshape= has shape {tuple(tensor.shape)}" if self._reshape is not None else ""
            raise ValueError(
                f"{self.method_name} needs a channel-first feature map (N, C, *spatial) with the input's "
                f"{inputs.dim()} dims, but layer {name or '(root)'!r} outputs shape {shape} {got}"
                f" for inputs of shape {tuple(inputs.shape)}; {hint}, or choose another `layer=`"
            )
        return tensor

    def record(self, inputs: torch.Tensor, target: TargetLike) -> tuple[list[LayerRecord], TargetLike]:
        """One forward (and, for gradient methods, one backward) with every layer captured.

        ``inputs`` is the channel-first batch. Returns the layers' records and the target frozen on
        this batch (classes ``(N,)`` or the callable).
        """
        layers = [LayerRef(name, module) for name, module in self._resolved_layers(inputs)]
        captures, frozen = self.layer_backend.capture(inputs, target, layers, gradients=self.uses_gradients)
        records = []
        for capture in captures:
            activation = self.to_channel_first(capture.name, capture.output, inputs)
            grad = capture.gradient
            gradient = self.to_channel_first(capture.name, grad, inputs) if grad is not None else None
            if gradient is not None and bool((gradient == 0).flatten(1).all(dim=1).any()):
                warnings.warn(
                    f"the score's gradient at layer {capture.name or '(root)'!r} is zero at every position "
                    f"for some images: the score does not depend on this map, so {self.method_name} is "
                    "empty there. (In a ViT's last block only the class token reaches the head; take a "
                    "layer before the last attention, e.g. blocks[-1].norm1.)",
                    stacklevel=4,
                )
            records.append(
                LayerRecord(capture.name, capture.layer, activation, gradient, capture.output, capture.calls)
            )
        return records, frozen

    # -- helpers for the perturbation CAMs ----------------------------------------------------------
    def row_scores(
        self,
        rows: int,
        make_batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        target: TargetLike,
        batch_size: int,
        progress: bool | None,
        replace: Callable[[int, int], Replacement] | None = None,
        bounds: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """Scores of ``rows`` perturbed inputs, forwarded ``batch_size`` at a time, ``(rows,)``.

        ``make_batch(start, stop)`` gives the channel-first inputs and the sample index of each row
        (the inputs may have fewer rows than ``stop - start``, when the replacement makes the layer's
        output the full chunk: the layers below then run on those inputs only);
        ``replace(start, stop)``, when given, the layer output that replaces the layer's for those rows.
        ``bounds``: the ``(start, stop)`` chunks, in order (default: ``batch_size`` rows each).
        """
        from tqdm.auto import tqdm

        show = progress if progress is not None else sys.stderr.isatty()
        out: list[torch.Tensor] = []
        chunks = bounds or [(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
        backend = self.layer_backend
        with backend.progress_session():
            for start, stop in tqdm(chunks, desc=type(self).__name__, disable=not show, leave=False):
                batch, samples = make_batch(start, stop)
                replacement = replace(start, stop) if replace is not None else None
                out.append(backend.row_scores(batch, samples, target, replacement))
        return torch.cat(out)


def check_batch_size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"batch_size must be a positive int (rows per forward pass), got {value!r}")
    return value
