"""Inputs validated once, before any probe (issue 16 item 14); eval_mode=False leaves BatchNorm
statistics as they were (item 12); IG's n_steps bounded and its nodes made per pass (item 10)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import bbdecoder.attribution.path_chunks as path_chunks_module
from bbdecoder import (
    FullGrad,
    GradCAM,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SimpleFullGrad,
    SmoothFullGrad,
    SmoothGrad,
)
from bbdecoder.attribution.quadrature import METHODS, quadrature, quadrature_slice
from bbdecoder.hooks import count_hooks
from bbdecoder.validation import missing_batch_dim

from .nets import make_net

EXPLAINERS: dict[str, Callable[[nn.Module], Any]] = {
    "gradient": lambda m: Gradient(m).attribute,
    "input_x_gradient": lambda m: InputXGradient(m).attribute,
    "integrated_gradients": lambda m: IntegratedGradients(m).attribute,
    "smoothgrad": lambda m: SmoothGrad(m, n_samples=2).attribute,
    "smoothgrad_ig": lambda m: SmoothGrad(IntegratedGradients(m), n_samples=2).saliency,
    "fullgrad": lambda m: FullGrad(m).saliency,
    "simple_fullgrad": lambda m: SimpleFullGrad(m).saliency,
    "smooth_fullgrad": lambda m: SmoothFullGrad(m, n_samples=2).saliency,
    "gradcam": lambda m: GradCAM(m).saliency,
}


def _counting(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_image_without_batch_dim_is_refused_before_any_forward(name: str) -> None:
    model = make_net("resnet", dtype=torch.float32)
    calls = _counting(model)
    explain = EXPLAINERS[name](model)
    with pytest.raises(
        ValueError, match=r"\(3, 16, 16\).*one sample.*'stem' takes 3 channels.*x\.unsqueeze\(0\)"
    ):
        explain(torch.rand(3, 16, 16))
    assert calls[0] == 0
    assert explain(torch.rand(1, 3, 16, 16)).shape[0] == 1


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused(name: str, bad: float) -> None:
    model = make_net("vgg", dtype=torch.float32)
    calls = _counting(model)
    x = torch.rand(2, 3, 16, 16)
    x[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=r"non-finite inputs are meaningless.*nan_to_num"):
        EXPLAINERS[name](model)(x)
    assert calls[0] == 0


def test_missing_batch_dim_rules() -> None:
    rgb = make_net("vgg", dtype=torch.float32)
    assert missing_batch_dim(rgb, (3, 16, 16)) is not None
    assert missing_batch_dim(rgb, (2, 3, 16, 16)) is None
    assert missing_batch_dim(rgb, (4, 16, 16)) is None  # 4 is not the channel count: not judged
    grey = nn.Sequential(nn.Conv2d(1, 2, 3))
    assert missing_batch_dim(grey, (1, 16, 16)) is None  # single channel: ambiguous, never refused
    tokens = nn.Sequential(nn.Linear(8, 4))
    assert missing_batch_dim(tokens, (8,)) is None


# -- eval_mode=False ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_eval_mode_false_keeps_running_statistics(name: str) -> None:
    model = make_net("resnet", dtype=torch.float32).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    makers: dict[str, Callable[[], Any]] = {
        "gradient": lambda: Gradient(model, eval_mode=False).attribute,
        "input_x_gradient": lambda: InputXGradient(model, eval_mode=False).attribute,
        "integrated_gradients": lambda: IntegratedGradients(model, eval_mode=False).attribute,
        "smoothgrad": lambda: SmoothGrad(Gradient(model, eval_mode=False), n_samples=2).attribute,
        "smoothgrad_ig": lambda: (
            SmoothGrad(IntegratedGradients(model, eval_mode=False), n_samples=2).saliency
        ),
        "fullgrad": lambda: FullGrad(model, eval_mode=False, check=False).saliency,
        "simple_fullgrad": lambda: SimpleFullGrad(model, eval_mode=False).saliency,
        "smooth_fullgrad": lambda: (
            SmoothGrad(FullGrad(model, eval_mode=False, check=False), n_samples=2).saliency
        ),
        "gradcam": lambda: GradCAM(model, eval_mode=False).saliency,
    }
    makers[name]()(torch.rand(4, 3, 16, 16))
    assert model.training
    assert count_hooks(model) == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_eval_mode_false_really_uses_batch_statistics_and_restores_on_error() -> None:
    model = make_net("resnet", dtype=torch.float32).train()
    x = torch.rand(4, 3, 16, 16)
    train_grad = Gradient(model, eval_mode=False).attribute(x, 0)
    eval_grad = Gradient(model).attribute(x, 0)
    assert not torch.allclose(train_grad, eval_grad)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    def failing_target(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Gradient(model, eval_mode=False).attribute(x, failing_target)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- IG's n_steps --------------------------------------------------------------------------------------
def test_absurd_n_steps_is_refused_before_any_allocation() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    calls = _counting(model)
    with pytest.raises(ValueError, match=r"n_steps=1000000000 is more than 1,000,000 path points"):
        IntegratedGradients(model).attribute(torch.rand(2, 4), n_steps=10**9)
    with pytest.raises(ValueError, match="gausslegendre supports at most 1024"):
        IntegratedGradients(model).attribute(torch.rand(2, 4), n_steps=5000, method="gausslegendre")
    assert calls[0] == 0


def test_nodes_are_made_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = path_chunks_module.quadrature_slice

    def recording(method: str, n_steps: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(stop - start)
        return real(method, n_steps, start, stop)

    monkeypatch.setattr(path_chunks_module, "quadrature_slice", recording)  # the IG path walk
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.rand(2, 4, dtype=torch.float64)
    attribution = IntegratedGradients(model).attribute(x, 1, n_steps=100_000, internal_batch_size=1000)
    assert max(sizes) <= 501 and len(sizes) == 200
    # an affine model: IG is exactly (x - 0) * w for every rule
    torch.testing.assert_close(attribution, x * model[0].weight[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_quadrature_slices_equal_the_whole_rule(method: str) -> None:
    alphas, weights = quadrature(method, 37)
    for start, stop in [(0, 37), (0, 5), (5, 36), (36, 37), (10, 10)]:
        part_alphas, part_weights = quadrature_slice(method, 37, start, stop)
        assert torch.equal(part_alphas, alphas[start:stop]) and torch.equal(part_weights, weights[start:stop])
