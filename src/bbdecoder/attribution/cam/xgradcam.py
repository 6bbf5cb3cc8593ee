"""XGrad-CAM (Fu et al. 2020)."""

from __future__ import annotations

import torch

from bbdecoder.attribution.cam.base import BaseCAM, CAMContext


class XGradCAM(BaseCAM):
    """XGrad-CAM: ``w_c = sum_ij g_cij A_cij / (sum_ij A_cij + 1e-7)``, ``g = dF/dA``.

    Constructor and calls as :class:`~bbdecoder.GradCAM`.
    """

    method_name = "XGrad-CAM"
    eps = 1e-7

    def cam_weights(
        self, ctx: CAMContext, activations: torch.Tensor, gradients: torch.Tensor | None
    ) -> torch.Tensor:
        assert gradients is not None
        a = activations.flatten(2)
        return (gradients.flatten(2) * a).sum(dim=2) / (a.sum(dim=2) + self.eps)
