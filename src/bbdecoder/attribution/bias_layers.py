"""Which modules carry a bias for FullGrad, and what that bias is *now*.

Biases are read at every forward call, never cached: weights change while training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

BIAS_LAYER_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear, _BatchNorm)
"""Every ``Conv*d`` (transposed too), ``Linear`` and ``BatchNorm*d``, found with ``isinstance``."""


def is_bias_layer(module: nn.Module) -> bool:
    return isinstance(module, BIAS_LAYER_TYPES)


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The constant a layer adds per output channel, or ``None`` when it adds none.

    BatchNorm with running statistics (eval mode) is the affine map
    ``gamma * (x - mean) / sqrt(var + eps) + beta``, whose constant is
    ``beta - mean * gamma / sqrt(var + eps)``. In train mode (batch statistics) it has no constant
    bias; FullGrad's completeness check then fails, as it should.
    """
    if isinstance(module, _BatchNorm):
        uses_running_stats = module.running_mean is not None and not (
            module.training or not module.track_running_stats
        )
        if not uses_running_stats:
            return None
        assert module.running_mean is not None and module.running_var is not None
        mean, var = module.running_mean, module.running_var
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -mean * scale
        if module.bias is not None:
            bias = bias + module.bias
        return bias.detach()
    own_bias = getattr(module, "bias", None)
    return own_bias.detach() if isinstance(own_bias, torch.Tensor) else None


def broadcast_bias(module: nn.Module, bias: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``bias`` shaped to broadcast against ``output``: channels on dim 1, or the last dim for Linear."""
    if isinstance(module, nn.Linear):
        return bias.view((1,) * (output.dim() - 1) + (-1,))
    return bias.view((1, -1) + (1,) * (output.dim() - 2))
