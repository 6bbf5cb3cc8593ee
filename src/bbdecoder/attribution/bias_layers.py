"""Which modules carry a bias for FullGrad, and what that bias is *now*.

Biases are read at every forward call, never cached: weights change while training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

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


# -- where a bias acts -----------------------------------------------------------------------------
# A stock torch layer returns the tensor its bias was added to, so its output is hooked. A subclass
# with its own ``forward`` (timm's ``BatchNormAct2d``: batch norm, then drop, then an activation
# child) may return something else, so for those the tensor the primitive op produced inside the
# forward is captured instead: the call of ``F.batch_norm`` / ``F.conv*d`` / ``F.linear`` that uses
# the module's own running statistics or bias, intercepted by a TorchFunctionMode active only while
# that module runs.

_CONV_PRIMITIVES = (
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)


def is_stock_layer(module: nn.Module) -> bool:
    """True when ``module``'s ``forward`` is torch's own (its output is the tensor the bias went into)."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls.__module__.startswith("torch.nn.modules.")
    return False


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name)


def applies_own_bias(module: nn.Module, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Is this torch call the primitive that adds ``module``'s (effective) bias?

    Matched by identity of the module's own tensors: BatchNorm's ``running_mean`` (its effective bias
    is defined by it), a Conv/Linear's ``bias`` (its weight may be re-standardised, as in timm's
    ``StdConv2d``, but the bias goes in as it is).
    """
    if isinstance(module, _BatchNorm):
        running_mean = module.running_mean
        return (
            func is F.batch_norm
            and running_mean is not None
            and _argument(args, kwargs, 1, "running_mean") is running_mean
        )
    own_bias = getattr(module, "bias", None)
    if not isinstance(own_bias, torch.Tensor):
        return False
    if func is F.linear or func in _CONV_PRIMITIVES:
        return _argument(args, kwargs, 2, "bias") is own_bias
    return False


class PrimitiveCapture(TorchFunctionMode):
    """While active, hands each output of a call that adds ``module``'s bias to ``on_output``.

    ``on_output`` runs at once, before the rest of the forward can modify the tensor in place (an
    in-place activation child), so a gradient hook it attaches sees the pre-activation gradient.
    """

    def __init__(self, module: nn.Module, on_output: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.module = module
        self.on_output = on_output
        self.count = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and applies_own_bias(self.module, func, args, kwargs):
            self.count += 1
            self.on_output(result)
        return result


class UnreachableBiasError(ValueError):
    """A bias layer whose biased (pre-activation) tensor cannot be found inside its forward."""

    def __init__(self, name: str, module: nn.Module) -> None:
        kind = type(module).__name__
        primitive = (
            "F.batch_norm with its running statistics"
            if isinstance(module, _BatchNorm)
            else ("F.conv*d / F.linear with its own bias")
        )
        super().__init__(
            f"FullGrad cannot find where the bias of layer {name!r} ({kind}) is added: the module has its "
            f"own forward (its output may already be activated) and it never called {primitive}, so the "
            "bias gradient would be taken at the wrong tensor. Split it into the plain torch layer followed "
            "by its activation (identical outputs), or use SimpleFullGrad."
        )
        self.layer = name
