"""LayerCAM (Jiang et al. 2021)."""

from __future__ import annotations

import torch

from bbdecoder.attribution.cam.base import BaseCAM, CAMContext


class LayerCAM(BaseCAM):
    """LayerCAM: ``ReLU(sum_c relu(g_c) * A_c)``, positive gradients weighting each position.

    Constructor and calls as :class:`~bbdecoder.GradCAM`; shallow layers give fine maps.
    """

    method_name = "LayerCAM"

    def cam_image(self, ctx: CAMContext) -> torch.Tensor:
        gradient = ctx.record.gradient
        assert gradient is not None
        return (torch.relu(gradient) * ctx.record.activation).sum(dim=1)
