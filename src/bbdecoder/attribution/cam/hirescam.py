"""HiResCAM (Draelos & Carin 2020)."""

from __future__ import annotations

import torch

from bbdecoder.attribution.cam.base import BaseCAM, CAMContext


class HiResCAM(BaseCAM):
    """HiResCAM: ``ReLU(sum_c g_c * A_c)``, the elementwise product of gradient and activation.

    Unlike Grad-CAM the gradient is not averaged over positions, so the map is faithful to what the
    score computes from this layer. Constructor and calls as :class:`~bbdecoder.GradCAM`.
    """

    method_name = "HiResCAM"

    def cam_image(self, ctx: CAMContext) -> torch.Tensor:
        gradient = ctx.record.gradient
        assert gradient is not None
        return (gradient * ctx.record.activation).sum(dim=1)
