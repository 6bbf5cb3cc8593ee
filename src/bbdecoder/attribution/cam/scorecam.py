"""Score-CAM (Wang et al. 2020): channel weights from the scores of activation-masked inputs."""

from __future__ import annotations

from typing import Any

import torch

from bbdecoder.attribution.base import InputTransform
from bbdecoder.attribution.cam.base import BaseCAM, CAMContext, check_batch_size
from bbdecoder.attribution.cam.reshape import ReshapeLike
from bbdecoder.attribution.postprocess import resize_to
from bbdecoder.layers import LayerSelection


class ScoreCAM(BaseCAM):
    """Score-CAM: each channel's map, upsampled to the input (bilinear, ``align_corners=True``) and
    min-max scaled to [0, 1], masks the input; ``w = softmax over channels of the masked inputs'
    scores``; map ``ReLU(sum_c w_c A_c)`` (pytorch-grad-cam 1.5.7's formula; the score is the raw
    target score, a logit for class targets).

    Gradient-free; costs one forward pass per sample and channel, ``batch_size`` masked inputs at a
    time (memory bounded by one chunk). ``progress``: a progress bar (``None``: when stderr is a TTY).
    A callable target is applied to each chunk's outputs and must score every row on its own.
    Otherwise the constructor and calls of :class:`~bbdecoder.GradCAM`.
    """

    method_name = "Score-CAM"
    uses_gradients = False

    def __init__(
        self,
        model: Any,
        layer: LayerSelection = None,
        reshape: ReshapeLike = None,
        *,
        batch_size: int = 32,
        progress: bool | None = None,
        target_layers: LayerSelection = None,
        reshape_transform: ReshapeLike = None,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(
            model,
            layer,
            reshape,
            target_layers=target_layers,
            reshape_transform=reshape_transform,
            input_transform=input_transform,
            eval_mode=eval_mode,
        )
        self.batch_size = check_batch_size(batch_size)
        self.progress = progress

    def cam_weights(
        self, ctx: CAMContext, activations: torch.Tensor, gradients: torch.Tensor | None
    ) -> torch.Tensor:
        inputs = ctx.inputs.detach()
        n, c = activations.shape[:2]
        size = tuple(inputs.shape[2:])

        def make_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(start, stop, device=activations.device)
            samples, channels = rows // c, rows % c
            maps = activations[samples, channels].unsqueeze(1).to(inputs.dtype)
            masks = resize_to(maps, size, align_corners=True).flatten(1)
            low = masks.amin(dim=1, keepdim=True)
            high = masks.amax(dim=1, keepdim=True)
            masks = ((masks - low) / (high - low + 1e-8)).view(-1, 1, *size)
            return inputs[samples.to(inputs.device)] * masks.to(inputs.device), samples

        scores = self.row_scores(n * c, make_batch, ctx.target, self.batch_size, self.progress)
        return torch.softmax(scores.view(n, c), dim=1).to(activations.dtype)
