"""Simple FullGrad against a brute-force float64 reference built from plain autograd.

Reference (Srinivas & Fleuret 2019, "Simple FullGrad"): psi(|x * dF/dx|) summed over channels,
plus, for every bias layer (Conv, Linear, BatchNorm) with a spatial output, the bilinear
(align_corners=True) upsampling of psi(|dF/d output|) summed over channels; psi is a per-sample
min-max over (C, H, W) jointly, (v - min) / (max - min + 1e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder import SimpleFullGrad


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _psi_channel_sum(values: torch.Tensor) -> torch.Tensor:
    magnitude = values.abs()
    flat = magnitude.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((magnitude - low) / (high - low + 1e-6)).sum(dim=1, keepdim=True)


def _reference(model: nn.Module, x: torch.Tensor, target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the map, its input-gradient part alone)."""
    model = model.double()
    x = x.double().clone().requires_grad_(True)
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs.append(output)

    layers = [m for m in model if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)]
    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        scores = model(x)[torch.arange(len(x)), torch.tensor(target)]
        scores.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    input_part = _psi_channel_sum(x * x.grad)
    result = input_part
    for output in outputs:
        if output.dim() == 4:  # layers with a spatial output
            layer = _psi_channel_sum(output.grad)
            result = result + F.interpolate(layer, size=x.shape[2:], mode="bilinear", align_corners=True)
    return result.detach(), input_part.detach()


def test_simple_fullgrad_equals_the_brute_force_reference() -> None:
    model = _model()
    x = torch.rand(3, 3, 12, 10)
    target = [4, 0, 2]
    expected, input_part = _reference(_model(), x, target)
    saliency = SimpleFullGrad(model).saliency(x, target)
    assert saliency.shape == (3, 1, 12, 10)
    torch.testing.assert_close(saliency.double(), expected, rtol=1e-4, atol=1e-4)
    # the layers' maps matter: without them the map is far outside the tolerance
    assert float((expected - input_part).abs().min()) > 0.1
