"""Gradient and InputXGradient: against Captum, against an analytic linear model, targets, model safety."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import Saliency
from torch import nn

from bbdecoder.attribution import Gradient, InputXGradient
from bbdecoder.hooks import count_hooks
from bbdecoder.targets import TargetError

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def small_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.Softplus(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, classes),
    )


class GlobalPoolNet(nn.Module):
    """Global average pooling over the last two dims: runs on an unbatched (C, H, W) input too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(-2, -1)))


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(x)
        return out, out.sum(dim=1)


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(7, 4).double()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(2))


# -- against Captum -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0, [1, 4, 2], torch.tensor([3, 3, 0])])
def test_gradient_matches_captum_saliency_signed(images: torch.Tensor, target: object) -> None:
    model = small_cnn().eval()
    ours = Gradient(model).attribute(images, target)
    captum_target = target.tolist() if isinstance(target, torch.Tensor) else target
    theirs = Saliency(model).attribute(images, target=captum_target, abs=False)
    assert ours.shape == images.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert (ours < 0).any(), "the gradient is signed"


def test_input_x_gradient_matches_captum(images: torch.Tensor) -> None:
    model = small_cnn().eval()
    ours = InputXGradient(model).attribute(images, [0, 1, 2])
    theirs = CaptumInputXGradient(model).attribute(images, target=[0, 1, 2])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


# -- analytic linear model ---------------------------------------------------------------------------
def test_linear_model_gradient_is_the_weight_row(linear: nn.Linear) -> None:
    x = torch.randn(5, 7, dtype=torch.float64)
    weight = linear.weight.detach()
    for k in range(4):
        gradient, input_x_gradient = Gradient(linear).attribute(x, k), InputXGradient(linear).attribute(x, k)
        torch.testing.assert_close(gradient, weight[k].expand(5, 7), rtol=0, atol=1e-15)
        torch.testing.assert_close(input_x_gradient, x * weight[k], rtol=0, atol=1e-15)


def test_target_semantics_on_linear_model(linear: nn.Linear) -> None:
    x = torch.randn(5, 7, dtype=torch.float64)
    weight = linear.weight.detach()
    explainer = Gradient(linear)
    per_sample = [3, 0, 1, 1, 2]
    expected = weight[per_sample]
    torch.testing.assert_close(explainer.attribute(x, per_sample), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(explainer.attribute(x, torch.tensor(per_sample)), expected, rtol=0, atol=1e-15)
    argmax = linear(x).argmax(dim=1)
    torch.testing.assert_close(explainer.attribute(x, None), weight[argmax], rtol=0, atol=1e-15)
    combined = explainer.attribute(x, lambda out: out[:, 1] + 2 * out[:, 2])
    torch.testing.assert_close(combined, (weight[1] + 2 * weight[2]).expand(5, 7), rtol=0, atol=1e-14)


# -- unhappy paths ----------------------------------------------------------------------------------
def test_wrong_length_target_list(linear: nn.Linear) -> None:
    with pytest.raises(TargetError, match=r"3 targets .* batch of 5"):
        Gradient(linear).attribute(torch.randn(5, 7, dtype=torch.float64), [0, 1, 2])


def test_out_of_range_class(linear: nn.Linear) -> None:
    with pytest.raises(TargetError, match=r"out of range.*4 outputs"):
        Gradient(linear).attribute(torch.randn(2, 7, dtype=torch.float64), 4)


def test_input_without_batch_dim_on_flat_model(linear: nn.Linear) -> None:
    with pytest.raises(ValueError, match="unsqueeze"):
        Gradient(linear).attribute(torch.randn(7, dtype=torch.float64), 0)


def test_input_without_batch_dim_on_image_model() -> None:
    model = GlobalPoolNet()
    with pytest.raises(ValueError, match=r"one sample \(C, H, W\) without its batch dimension.*unsqueeze"):
        Gradient(model).attribute(torch.rand(3, 6, 6), 0)
    assert Gradient(model).attribute(torch.rand(1, 3, 6, 6), 0).shape == (1, 3, 6, 6)


def test_tuple_output_asks_for_a_callable_target() -> None:
    model = TupleNet()
    x = torch.randn(2, 4)
    with pytest.raises(TargetError, match="callable"):
        Gradient(model).attribute(x, 0)
    grad = Gradient(model).attribute(x, lambda out: out[0][:, 2])
    torch.testing.assert_close(grad, model.fc.weight.detach()[2].expand(2, 4))


def test_integer_inputs_are_refused(linear: nn.Linear) -> None:
    with pytest.raises(TypeError, match="floating point"):
        Gradient(linear).attribute(torch.ones(2, 7, dtype=torch.long), 0)


# -- the model is left as it was --------------------------------------------------------------------
@pytest.mark.parametrize("explainer_class", [Gradient, InputXGradient])
def test_model_untouched(explainer_class: type, images: torch.Tensor) -> None:
    model = small_cnn().train()
    model[1].eval()  # a mixed-mode model: every flag must come back as it was
    model[0].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = explainer_class(model).attribute(images, 1)
    second = explainer_class(model).attribute(images, 1)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # eval mode: dropout is off
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert count_hooks(model) == 0
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_forward_error_leaves_model_clean() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Exploding()).train()
    with pytest.raises(RuntimeError, match="boom"):
        Gradient(model).attribute(torch.randn(2, 4), 0)
    assert all(m.training for m in model.modules())
    assert count_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_unbatched_image_failing_inside_the_model_gets_a_batch_hint() -> None:
    # A single-channel model is not judged up front ((1, H, W) may be a batch of one for a model that
    # adds its own channel axis), so the failure inside the model carries the hint instead.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    with pytest.raises(RuntimeError) as info:
        Gradient(model).attribute(torch.randn(1, 8, 8))  # conv2d accepts it, the Linear does not
    notes = getattr(info.value, "__notes__", [])
    assert any("unsqueeze(0)" in note for note in notes)
