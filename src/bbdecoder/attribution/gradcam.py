"""Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer, InputTransform, check_inputs, leaf_input
from bbdecoder.attribution.postprocess import minmax_per_sample, resize_to
from bbdecoder.layers import LayerIndex, LayerSelector
from bbdecoder.targets import TargetLike


class GradCAM(Explainer):
    """Grad-CAM on one layer: ``ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of dF/dA_c.

    Args:
        model: the classifier (never modified).
        layer: the layer whose output A is used: a module, a leaf's qualified name or ID. ``None``
            picks the last leaf module, in execution order, whose output has the input's number of
            dims and more than one spatial position (for an image CNN: the last 4-D feature map that
            is not 1x1).

    A module that runs several times in one forward pass (a shared ReLU) is read at its last call.
    ``saliency`` upsamples the map bilinearly (``align_corners=False``, like an image resize) to the
    input's spatial size and min-max scales it per image to [0, 1]; ``layer_map`` gives the raw map.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSelector | None = None,
        *,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, input_transform=input_transform, eval_mode=eval_mode)
        self.layer: nn.Module | None = None
        if layer is not None:
            self.layer = layer if isinstance(layer, nn.Module) else LayerIndex(model).select(layer)[0].module
            if isinstance(layer, (str, int)) and len(LayerIndex(model).select(layer)) != 1:
                raise ValueError(f"the layer selector {layer!r} must name exactly one layer")

    def layer_map(self, inputs: torch.Tensor, target: TargetLike = None) -> torch.Tensor:
        """The raw Grad-CAM map at the layer's resolution, (N, 1, *layer_spatial), non-negative."""
        check_inputs(inputs, min_dim=3, model=self.model)
        layer = self.layer if self.layer is not None else self._default_layer(inputs)
        activations: list[torch.Tensor] = []
        gradients: dict[int, torch.Tensor] = {}
        x = leaf_input(inputs)
        with self.session() as hooks:

            def forward_hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(
                        f"Grad-CAM needs a layer with a tensor output, got {type(output).__name__}"
                    )
                call = len(activations)
                # A copy: an in-place activation after this layer would otherwise change A.
                activations.append(output.detach().clone())
                hooks.tensor_hook(output, lambda grad: gradients.__setitem__(call, grad))

            hooks.forward_hook(layer, forward_hook)
            scores, _ = self.scores(x, target)
            if not activations:
                raise RuntimeError("the Grad-CAM layer did not run in the forward pass")
            torch.autograd.grad(scores.sum(), x, allow_unused=True)
        # A module that runs several times (a shared ReLU) contributes its last call: the deepest map.
        last = len(activations) - 1
        activation = activations[last]
        gradient = gradients.get(last, torch.zeros_like(activation))
        spatial_dims = tuple(range(2, activation.dim()))
        weights = gradient.mean(dim=spatial_dims, keepdim=True)
        return torch.relu((weights * activation).sum(dim=1, keepdim=True))

    def saliency(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """Grad-CAM map (N, 1, *spatial) at input resolution, min-max scaled to [0, 1] per image."""
        cam = self.layer_map(inputs, target)
        return minmax_per_sample(resize_to(cam, tuple(inputs.shape[2:]), align_corners=False))

    def _default_layer(self, inputs: torch.Tensor) -> nn.Module:
        candidates: list[nn.Module] = []
        with self.session() as hooks, torch.no_grad():
            for info in LayerIndex(self.model):

                def record(module: nn.Module, _inputs: Any, output: Any) -> None:
                    if (
                        isinstance(output, torch.Tensor)
                        and output.dim() == inputs.dim()
                        and output.shape[2:].numel() > 1
                    ):
                        candidates.append(module)

                hooks.forward_hook(info.module, record)
            self.forward(inputs[:1])
        if not candidates:
            raise ValueError(
                "found no layer with a spatial output for Grad-CAM; pass `layer=` (a module, name or ID)"
            )
        self.layer = candidates[-1]
        return self.layer
