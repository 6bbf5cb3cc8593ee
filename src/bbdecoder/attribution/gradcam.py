"""Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradient."""

from __future__ import annotations

import torch

from bbdecoder.attribution.cam.base import BaseCAM, CAMContext


class GradCAM(BaseCAM):
    """Grad-CAM: ``ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of dF/dA_c.

    ``GradCAM(model, layer=None, reshape=None)``; ``layer_map(x, target)`` gives the raw map
    ``(N, 1, *layer_spatial)``, ``saliency(x, target)`` the map ``(N, 1, *spatial)`` resized
    bilinearly to the input (``align_corners=False``) and min-max scaled to [0, 1] per image. See
    :class:`~bbdecoder.attribution.cam.BaseCAM` for the layer choices (names, globs, lists, the default).
    """

    method_name = "Grad-CAM"

    def cam_weights(
        self, ctx: CAMContext, activations: torch.Tensor, gradients: torch.Tensor | None
    ) -> torch.Tensor:
        assert gradients is not None
        return gradients.flatten(2).mean(dim=2)
