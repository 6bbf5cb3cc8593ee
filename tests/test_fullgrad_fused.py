"""FullGrad on bias layers with their own forward: timm's BatchNormAct2d pattern (BN, drop, act children)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import FullGrad, SimpleFullGrad
from bbdecoder.attribution import CompletenessError, UnreachableBiasError
from bbdecoder.hooks import count_hooks

from .nets import randomize_batchnorm


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, trimmed: F.batch_norm on the module's own buffers, then drop, then act."""

    def __init__(self, channels: int, inplace: bool = True) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class HandRolledBatchNormAct(nn.BatchNorm2d):
    """A BN subclass computing the normalisation by hand: its biased tensor cannot be located."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.running_mean is not None and self.running_var is not None
        shape = (1, -1, 1, 1)
        y = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        return self.act(y * self.weight.view(shape) + self.bias.view(shape))


class ConvReLU(nn.Conv2d):
    """A Conv2d subclass that applies its activation child inside forward."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def fused_net(norm: type[nn.Module] = BatchNormAct2d, *, split: bool = False) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        if split:
            return [conv, nn.BatchNorm2d(cout), nn.Identity(), nn.ReLU(inplace=True)]
        return [conv, norm(cout)]

    torch.manual_seed(0)
    layers = [
        *block(3, 6),
        nn.MaxPool2d(2),
        *block(6, 8),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    ]
    return randomize_batchnorm(nn.Sequential(*layers)).double().eval()


def _inputs() -> torch.Tensor:
    return torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_batchnorm_act_module_is_complete_in_float64() -> None:
    model = fused_net()
    fullgrad = FullGrad(model, im_size=(3, 12, 12))
    decomposition = fullgrad.decompose(_inputs(), [0, 1, 3])
    assert decomposition.relative_error().max() < 1e-10
    assert decomposition.layer_names.count("1") == 1 and decomposition.layer_names.count("4") == 1


def test_fused_and_split_nets_give_the_same_decomposition_and_map() -> None:
    fused, split = fused_net(), fused_net(split=True)
    # the split copy has its layers at other indices: copy parameters and buffers by position
    for a, b in zip(
        [m for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))],
        [m for m in split.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))],
        strict=True,
    ):
        b.load_state_dict(a.state_dict())
    x = _inputs()
    torch.testing.assert_close(fused(x), split(x), rtol=0, atol=0)
    ours = FullGrad(fused, im_size=(3, 12, 12)).decompose(x, 2)
    theirs = FullGrad(split, im_size=(3, 12, 12)).decompose(x, 2)
    assert len(ours.bias_gradients) == len(theirs.bias_gradients)
    for a, b in zip(ours.bias_gradients, theirs.bias_gradients, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        FullGrad(fused).saliency(x, 2), FullGrad(split).saliency(x, 2), rtol=1e-12, atol=1e-12
    )


def test_taking_the_bias_gradient_after_the_activation_is_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this guards against: treating the fused module like a stock layer (hooking its output)."""
    import bbdecoder.backends.layers_torch as fullgrad_module

    monkeypatch.setattr(fullgrad_module, "is_stock_layer", lambda module: True)
    with pytest.raises(CompletenessError):
        FullGrad(fused_net(), im_size=(3, 12, 12))


def test_conv_subclass_with_activation_child_is_complete() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ConvReLU(3, 5), nn.Flatten(), nn.Linear(5 * 8 * 8, 3)).double().eval()
    with torch.no_grad():
        model[0].bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert FullGrad(model).decompose(x, 1).relative_error().max() < 1e-10


@pytest.mark.parametrize("check", [True, False])
def test_unreachable_pre_activation_is_refused_by_name(check: bool) -> None:
    model = fused_net(HandRolledBatchNormAct)
    fullgrad = FullGrad(model, check=check)
    with pytest.raises(UnreachableBiasError, match=r"'1' \(HandRolledBatchNormAct\).*SimpleFullGrad"):
        fullgrad.saliency(_inputs(), 0)
    assert count_hooks(model) == 0
    # the TorchFunctionMode entered for the failing layer is gone: torch ops run unintercepted
    assert torch.overrides._get_current_function_mode() is None  # type: ignore[attr-defined]
    # SimpleFullGrad needs no exact bias: it falls back to the layer's output
    maps = SimpleFullGrad(model).saliency(_inputs(), 0)
    assert maps.shape == (3, 1, 12, 12) and bool(torch.isfinite(maps).all())


def test_check_false_still_reports_the_relative_error() -> None:
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double().eval()
    )
    with torch.no_grad():
        model[0].weight.mul_(20)
    fullgrad = FullGrad(model, check=False)
    fullgrad.saliency(torch.randn(2, 3, 8, 8, dtype=torch.float64), 0)
    assert fullgrad.last_relative_error is not None and fullgrad.last_relative_error.shape == (2,)
    assert float(fullgrad.last_relative_error.max()) > 1e-6


def test_fused_layer_leaves_the_model_as_found() -> None:
    model = fused_net()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    FullGrad(model).saliency(_inputs(), 1)
    assert model.training and all(m.training for m in model.modules())
    assert count_hooks(model) == 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


class FailingAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("act failed")


def test_a_forward_failing_inside_a_fused_layer_leaves_no_capture_mode() -> None:
    model = fused_net()
    model[1].act = FailingAct()
    with pytest.raises(RuntimeError, match="act failed"):
        FullGrad(model).saliency(_inputs(), 0)
    assert torch.overrides._get_current_function_mode() is None  # type: ignore[attr-defined]
    assert count_hooks(model) == 0
