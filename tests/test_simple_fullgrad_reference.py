"""SimpleFullGrad against an independent loop: retain_grad on every bias layer's output, then the
reference's aggregation (psi per layer, every channel upsampled on its own, channels summed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import SimpleFullGrad

from .nets import make_net


def _psi(values: torch.Tensor) -> torch.Tensor:
    values = values.abs()
    shape = (-1,) + (1,) * (values.dim() - 1)
    low = values.flatten(1).min(1).values.view(shape)
    values = values - low
    return values / (values.flatten(1).max(1).values.view(shape) + 1e-6)


def _has_bias(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True  # eval mode: beta - mean * gamma / sqrt(var + eps)
    return isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None


def reference_simple_fullgrad(
    model: nn.Module, x: torch.Tensor, target: list[int], skip: int | None = None
) -> torch.Tensor:
    """``psi(|x dF/dx|)`` + sum over bias-layer *calls* with spatial output of upsample(psi(|dF/dy|)).

    ``skip``: leave out that call (in forward order) -- to show the comparison sees one missing layer.
    """
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        # The kept tensor is a copy that nothing downstream modifies in place (ReLU(inplace=True)
        # would otherwise change what its .grad refers to); the model goes on with a second copy.
        kept = output.clone()
        kept.retain_grad()
        outputs.append(kept)
        return kept.clone()

    handles = [m.register_forward_hook(keep) for m in model.modules() if _has_bias(m)]
    try:
        point = x.clone().requires_grad_(True)
        score = model(point)[torch.arange(len(target)), torch.tensor(target)].sum()
        score.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    assert point.grad is not None
    total = _psi(point.grad * x).sum(1, keepdim=True)
    for index, output in enumerate(outputs):
        if index == skip or output.dim() != 4:
            continue
        assert output.grad is not None
        scaled = _psi(output.grad)
        for channel in range(scaled.shape[1]):
            total = total + F.interpolate(
                scaled[:, channel : channel + 1], size=x.shape[2:], mode="bilinear", align_corners=True
            )
    return total


class SharedTwice(nn.Module):
    """A conv used twice, a conv that never runs, a bias-free conv: calls, not modules, count."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.no_bias = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        x = torch.relu(self.bn(self.no_bias(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    shared = SharedTwice().double().eval()
    with torch.no_grad():
        shared.bn.running_mean.uniform_(-1, 1)
        shared.bn.running_var.uniform_(0.5, 2)
    return {
        "vgg": make_net("vgg"),
        "resnet": make_net("resnet"),
        "densenet": make_net("densenet"),
        "shared": shared,
    }


@pytest.mark.parametrize("kind", ["vgg", "resnet", "densenet", "shared"])
def test_simple_fullgrad_equals_the_independent_loop(kind: str) -> None:
    model = _models()[kind]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = [0, 2, 1]
    ours = SimpleFullGrad(model).saliency(x, target)
    reference = reference_simple_fullgrad(model, x, target)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    # every layer's map matters: the loop without any single call is far from ours
    with torch.no_grad():
        calls = []
        handles = [
            m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if _has_bias(m)
        ]
        model(x)
        for handle in handles:
            handle.remove()
    spatial_calls = 0
    for skip in range(len(calls)):
        without = reference_simple_fullgrad(model, x, target, skip=skip)
        if torch.equal(without, reference):
            continue  # a non-spatial call (the Linear head) has no map to drop
        spatial_calls += 1
        assert (without - ours).abs().max() > 1e-3
    assert spatial_calls >= 3
