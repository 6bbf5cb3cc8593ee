"""Rank statistics against scipy, and the cascading randomisation check on small models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient
from bbdecoder.hooks import count_hooks
from bbdecoder.metrics import average_ranks, randomisation_check, spearman
from bbdecoder.viz.metric_plots import plot_randomisation


def test_average_ranks_and_spearman_match_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=g).float()  # many ties
    b = torch.rand(6, 40, generator=g)
    b[:, :10] = 0.0
    for i in range(6):
        np.testing.assert_allclose(average_ranks(a)[i].numpy(), stats.rankdata(a[i].numpy()))
    expected = [stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(6)]
    np.testing.assert_allclose(spearman(a, b).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_spearman_of_a_constant_map_is_nan() -> None:
    out = spearman(torch.ones(2, 9), torch.rand(2, 9))
    assert torch.isnan(out).all()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    ).eval()


def test_cascade_is_top_down_cumulative_and_leaves_the_model_alone() -> None:
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    explainer = Gradient(model)
    result = randomisation_check(explainer, x, seed=3)
    assert result.stages == ["6", "3", "1", "0"]  # Linear, Conv, BN, Conv: output first
    assert result.spearman.shape == (4, 4)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert explainer.model is model and count_hooks(model) == 0 and not model.training
    # Each stage's number is the scipy Spearman of the stored maps.
    for stage, maps in enumerate(result.randomised):
        for i in range(4):
            rho = stats.spearmanr(result.original[i].flatten().numpy(), maps[i].flatten().numpy()).statistic
            assert abs(float(result.spearman[stage, i]) - rho) < 1e-6
    # Cumulative: the last stage's maps are those of a model with every listed layer re-initialised,
    # so they differ from the original; and re-running with the same seed reproduces them.
    again = randomisation_check(Gradient(model), x, seed=3)
    torch.testing.assert_close(again.spearman, result.spearman)
    assert float(result.spearman[-1].mean()) < 0.9


class _InputOnly:
    """An 'explainer' that ignores the model (an edge detector, say): randomisation cannot change it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def saliency(self, inputs: torch.Tensor, target: Any = None) -> torch.Tensor:
        return inputs.abs().sum(1, keepdim=True)


def test_a_model_independent_map_keeps_correlation_one() -> None:
    x = torch.rand(3, 1, 8, 8)
    result = randomisation_check(_InputOnly(_cnn()), x)
    torch.testing.assert_close(result.spearman, torch.ones_like(result.spearman))
    assert result.summary()["mean"] == pytest.approx(1.0)


def test_gradcam_layer_follows_the_copy_and_layers_can_be_chosen(tmp_path) -> None:
    model = _cnn()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    explainer = GradCAM(model, layer="4")
    result = randomisation_check(explainer, x, layers=[nn.Linear, "3"])
    assert result.stages == ["6", "3"]
    assert explainer.layer is model[4]
    figure_path = tmp_path / "randomisation.png"
    gradient = randomisation_check(Gradient(model), x, layers=[nn.Linear, "3"])
    plot_randomisation({"Grad-CAM": result, "Gradient": gradient}, figure_path)
    assert figure_path.stat().st_size > 5000
    with pytest.raises(ValueError, match="same `layers=`"):
        plot_randomisation({"a": result, "b": randomisation_check(Gradient(model), x)})


def test_bad_explainer_and_empty_selection() -> None:
    with pytest.raises(TypeError, match="saliency"):
        randomisation_check(object(), torch.rand(1, 1, 8, 8))
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match="no layer with parameters"):
        randomisation_check(_InputOnly(model), torch.rand(1, 1, 2, 2))
