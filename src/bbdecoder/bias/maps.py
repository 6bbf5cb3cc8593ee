"""Attention maps for bias scores: any explainer, Grad-CAM on the last spatial layer by default."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bbdecoder.targets import TargetLike


def default_explainer(model: nn.Module) -> Any:
    """Grad-CAM on the model's last module with a 4-D output (the default of ``GradCAM``)."""
    from bbdecoder.attribution.gradcam import GradCAM

    return GradCAM(model)


def attention_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    explainer: Any = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Non-negative attention maps (N, 1, H, W) at input resolution, computed in batches.

    Args:
        model: the network whose attention is measured.
        inputs: (N, C, H, W).
        target: ``None`` (arg-max), an int, one class per sample, or a callable ``f(output) -> (N,)``
            (e.g. a protected-attribute output for a heatmap score).
        explainer: any object with ``saliency(inputs, target) -> (N, 1, H, W)``, e.g. ``FullGrad(model)``;
            ``None`` builds ``GradCAM(model)`` (last layer with a 4-D output).
        batch_size: images per call to the explainer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    explainer = explainer if explainer is not None else default_explainer(model)
    if not hasattr(explainer, "saliency"):
        raise TypeError(f"explainer {type(explainer).__name__} has no saliency(inputs, target) method")
    chunks = []
    for start in range(0, inputs.shape[0], batch_size):
        chunk_target = target
        if isinstance(target, (torch.Tensor, list, tuple)):
            chunk_target = torch.as_tensor(target)[start : start + batch_size]
        chunks.append(explainer.saliency(inputs[start : start + batch_size], chunk_target).detach())
    return torch.cat(chunks)
