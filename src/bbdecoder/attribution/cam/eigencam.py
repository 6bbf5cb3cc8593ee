"""EigenCAM (Muhammad & Yeasin 2020): the first principal component of the activations."""

from __future__ import annotations

import torch

from bbdecoder.attribution.cam.base import BaseCAM, CAMContext


class EigenCAM(BaseCAM):
    """EigenCAM: the activations (positions x channels), centred over positions, projected on their
    first right singular vector; ReLU. Gradient-free: the target is ignored (one forward pass).

    The sign of a singular vector is arbitrary (pytorch-grad-cam 1.5.7 keeps whatever LAPACK
    returns); here it is fixed so that the component's channel loadings sum to a positive number,
    i.e. the map correlates positively with the channel-summed activation. NaNs count as 0.
    Constructor and calls as :class:`~bbdecoder.GradCAM`.
    """

    method_name = "EigenCAM"
    uses_gradients = False

    def cam_image(self, ctx: CAMContext) -> torch.Tensor:
        activation = ctx.record.activation
        a = torch.nan_to_num(activation, nan=0.0)
        x = a.flatten(2).transpose(1, 2)  # (N, positions, C)
        x = x - x.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh[:, 0, :]  # (N, C)
        sign = torch.where(v.sum(dim=1, keepdim=True) < 0, -1.0, 1.0).to(v)
        projection = (x @ (v * sign).unsqueeze(2)).squeeze(2)
        return projection.view(activation.shape[0], *activation.shape[2:])
