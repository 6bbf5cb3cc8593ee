"""Completeness of FullGrad and Integrated Gradients, checked against independent forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bbdecoder.attribution.fullgrad import FullGrad
from bbdecoder.attribution.gradient import Gradient, InputXGradient
from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.demo.digits import DigitsCNN
from bbdecoder.metrics import completeness


def _trained_like_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN(width=4)
    with torch.no_grad():  # non-trivial BatchNorm statistics so the BN effective bias matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_fullgrad_is_complete_per_sample_in_float64() -> None:
    model = _trained_like_cnn().double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = completeness(FullGrad(model, check=False), x, target=[0, 1, 2, 3, 4])
    assert result.relative_error.shape == (5,) and result.method == "fullgrad"
    assert float(result.relative_error.max()) < 1e-10
    with torch.no_grad():
        expected = model(x)[torch.arange(5), torch.tensor([0, 1, 2, 3, 4])]
    torch.testing.assert_close(result.expected, expected)
    assert result.summary()["max"] < 1e-10


def test_fullgrad_reports_incompleteness_of_a_smooth_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x = torch.randn(4, 1, 8, 8)
    result = completeness(FullGrad(model, check=False), x)
    assert float(result.relative_error.mean()) > 1e-3  # tanh has no bias-only offsets: not complete


def test_integrated_gradients_error_shrinks_with_steps_and_matches_its_delta() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Softplus(), nn.Linear(8, 3)).eval().double()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ig = IntegratedGradients(model)
    coarse = completeness(ig, x, target=1, n_steps=4)
    fine = completeness(ig, x, target=1, n_steps=256)
    assert coarse.method == "baseline"
    assert float(fine.relative_error.mean()) < float(coarse.relative_error.mean())
    assert float(fine.relative_error.max()) < 1e-3
    with torch.no_grad():
        expected = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(fine.expected, expected)
    assert fine.convergence_delta is not None
    torch.testing.assert_close(fine.convergence_delta, fine.total - fine.expected, rtol=1e-6, atol=1e-8)


def test_ig_is_exact_for_a_linear_model_and_uses_the_given_baseline() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 2)).eval().double()
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    for baseline in ("black", "white", 0.25):
        result = completeness(IntegratedGradients(model), x, target=0, baseline=baseline, n_steps=3)
        assert float(result.relative_error.max()) < 1e-10


def test_input_x_gradient_of_a_bias_free_linear_model_is_complete() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 2, bias=False)).eval().double()
    x = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    result = completeness(InputXGradient(model), x)
    assert float(result.relative_error.max()) < 1e-12
    assert result.convergence_delta is None


def test_gradient_is_not_complete() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 2)).eval()
    x = torch.rand(3, 1, 3, 3) + 1.0
    assert float(completeness(Gradient(model), x).relative_error.mean()) > 1e-2


def test_bad_explainer_and_inputs() -> None:
    with pytest.raises(TypeError, match="attribute"):
        completeness(object(), torch.rand(2, 1, 3, 3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 2))
    with pytest.raises(TypeError, match="floating point"):
        completeness(InputXGradient(model), torch.ones(2, 1, 3, 3, dtype=torch.long))
