"""Grad-CAM++ (Chattopadhay et al. 2018)."""

from __future__ import annotations

import torch

from bbdecoder.attribution.cam.base import BaseCAM, CAMContext


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++: ``w_c = sum_ij relu(g_cij) a_cij`` with
    ``a_cij = g^2 / (2 g^2 + (sum_ij A_cij) g^3 + 1e-6)`` (0 where ``g == 0``), ``g = dF/dA``.

    The closed form of the paper's eq. 19 with first derivatives standing in for the higher ones, as
    pytorch-grad-cam 1.5.7 computes it. Constructor and calls as :class:`~bbdecoder.GradCAM`.
    """

    method_name = "Grad-CAM++"
    eps = 1e-6

    def cam_weights(
        self, ctx: CAMContext, activations: torch.Tensor, gradients: torch.Tensor | None
    ) -> torch.Tensor:
        assert gradients is not None
        g = gradients.flatten(2)
        g2 = g * g
        sum_a = activations.flatten(2).sum(dim=2, keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g2 * g + self.eps)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return (torch.relu(g) * alpha).sum(dim=2)
