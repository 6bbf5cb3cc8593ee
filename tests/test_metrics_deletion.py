"""Deletion / insertion AUC, MoRF / LeRF and ROAD imputation against brute force and analytic oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder.attribution.baselines import gaussian_blur
from bbdecoder.attribution.gradient import Gradient
from bbdecoder.metrics import deletion, insertion, morf_lerf, noisy_linear_impute, perturbation_curve


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 5, 3)
    ).eval()


def _brute_force(model, x, saliency, classes, mode, substrate, step):
    """One image and one step at a time, pixels ranked with numpy (stable: raster order on ties)."""
    n, _, h, w = x.shape
    curves = []
    for i in range(n):
        order = np.argsort(-saliency[i].flatten().numpy(), kind="stable")
        counts = [*range(0, h * w, step), h * w]
        curve = []
        for k in counts:
            chosen = np.zeros(h * w, dtype=bool)
            chosen[order[:k]] = True
            chosen_t = torch.from_numpy(chosen).view(1, h, w)
            if mode == "deletion":
                image = torch.where(chosen_t, substrate[i], x[i])
            else:
                image = torch.where(chosen_t, x[i], substrate[i])
            with torch.no_grad():
                curve.append(float(model(image[None]).softmax(1)[0, classes[i]]))
        curves.append(curve)
    curves_np = np.array(curves)
    fractions = np.array(counts) / (h * w)
    return curves_np, np.trapezoid(curves_np, fractions, axis=1)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_batched_curves_equal_a_per_step_loop(mode: str) -> None:
    model = _cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 6, 5, generator=g)
    saliency = torch.rand(3, 1, 6, 5, generator=g)
    saliency[0, 0, :2] = 0.5  # ties are broken in raster order
    substrate_name = "zero" if mode == "deletion" else "blur"
    substrate = torch.zeros_like(x) if mode == "deletion" else gaussian_blur(x, 0.6)
    classes = torch.tensor([0, 2, 1])
    result = perturbation_curve(
        model, x, saliency, classes, mode=mode, step=4, substrate=substrate_name, batch_size=7, blur_sigma=0.6
    )
    curves, auc = _brute_force(model, x, saliency[:, 0], classes, mode, substrate, 4)
    np.testing.assert_allclose(result.curves.numpy(), curves, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.auc.numpy(), auc, rtol=1e-5, atol=1e-6)
    assert result.fractions[0] == 0 and result.fractions[-1] == 1
    assert result.curves.shape == (3, 1 + 8)  # 30 pixels in steps of 4: 0, 4, ..., 28, 30
    assert set(result.summary()) >= {"mean", "std", "median", "n"}


class _Linear(nn.Module):
    """Two logits (0, w . x): the probability of class 1 is sigmoid(sum of contributions)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (x * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def test_linear_model_best_ordering_is_input_times_weight() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1, 1, 5, 5, generator=g, dtype=torch.float64) * 0.5
    x = torch.rand(4, 1, 5, 5, generator=g, dtype=torch.float64)
    model = _Linear(w).double()
    contributions = x * w  # InputXGradient is exact here
    result = deletion(model, x, contributions, 1, step=1)
    # Analytic curve: after k steps the k largest contributions are gone.
    sorted_contrib = torch.sort(contributions.flatten(1), dim=1, descending=True).values
    remaining = contributions.flatten(1).sum(1, keepdim=True) - torch.cat(
        [torch.zeros(4, 1, dtype=torch.float64), sorted_contrib.cumsum(1)], dim=1
    )
    expected = torch.sigmoid(remaining)
    torch.testing.assert_close(result.curves.double(), expected, rtol=1e-6, atol=1e-6)
    # No ordering does better: a random map can only tie or lose, sample by sample.
    for seed in range(10):
        random_maps = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(seed))
        other = deletion(model, x, random_maps, 1, step=1)
        assert bool((result.auc <= other.auc + 1e-6).all())
    orders = morf_lerf(model, x, contributions, 1, step=1)
    assert bool((orders["lerf"].auc > orders["morf"].auc).all())
    torch.testing.assert_close(orders["morf"].auc, result.auc)


def test_random_order_is_seeded_and_endpoints_are_clean_and_substrate() -> None:
    model = _cnn()
    x = torch.rand(2, 2, 6, 5, generator=torch.Generator().manual_seed(3))
    ones = torch.ones(2, 1, 6, 5)
    a = perturbation_curve(model, x, ones, order="random", seed=5)
    b = perturbation_curve(model, x, ones, order="random", seed=5)
    c = perturbation_curve(model, x, ones, order="random", seed=6)
    assert torch.equal(a.curves, b.curves) and not torch.equal(a.curves, c.curves)
    with torch.no_grad():
        clean = model(x).softmax(1)
        zero = model(torch.zeros_like(x)).softmax(1)
    classes = clean.argmax(1)
    torch.testing.assert_close(a.curves[:, 0], clean[torch.arange(2), classes])
    torch.testing.assert_close(a.curves[:, -1], zero[torch.arange(2), classes])
    ins = insertion(model, x, ones, substrate=0.3)
    torch.testing.assert_close(ins.curves[:, -1], clean[torch.arange(2), classes])


def test_explainer_is_accepted_and_model_mode_restored() -> None:
    model = _cnn().train()
    x = torch.rand(3, 2, 6, 5, generator=torch.Generator().manual_seed(4))
    explainer = Gradient(model)
    from_explainer = deletion(model, x, explainer)
    classes = from_explainer.classes
    maps = explainer.saliency(x, classes)
    from_tensor = deletion(model, x, maps, classes)
    torch.testing.assert_close(from_explainer.auc, from_tensor.auc)
    assert model.training and all(m.training for m in model.modules())


def test_low_resolution_saliency_is_upsampled() -> None:
    model = _cnn()
    x = torch.rand(2, 2, 6, 5)
    coarse = torch.rand(2, 1, 3, 3)
    result = deletion(model, x, coarse, step=2)
    assert result.curves.shape == (2, 16)


def test_road_imputation_solves_the_neighbour_system() -> None:
    scipy_sparse = pytest.importorskip("scipy.sparse")
    from scipy.sparse.linalg import spsolve

    g = torch.Generator().manual_seed(7)
    h, w = 7, 6
    image = torch.rand(1, 1, h, w, generator=g, dtype=torch.float64)
    removed = torch.rand(1, 1, h, w, generator=g) < 0.5
    out = noisy_linear_impute(image, removed, noise=0.0, tol=1e-12)
    # Oracle: sum_j w_ij (v_i - v_j) = 0 for removed i, kept pixels fixed, solved with scipy.
    weights = {(-1, 0): 1 / 6, (1, 0): 1 / 6, (0, -1): 1 / 6, (0, 1): 1 / 6}
    weights.update({(a, b): 1 / 12 for a in (-1, 1) for b in (-1, 1)})
    idx = {p: k for k, p in enumerate(zip(*np.nonzero(removed[0, 0].numpy()), strict=True))}
    matrix = scipy_sparse.lil_matrix((len(idx), len(idx)))
    rhs = np.zeros(len(idx))
    img = image[0, 0].numpy()
    for (r, c), k in idx.items():
        for (dr, dc), wt in weights.items():
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w:
                matrix[k, k] += wt
                if (rr, cc) in idx:
                    matrix[k, idx[(rr, cc)]] -= wt
                else:
                    rhs[k] += wt * img[rr, cc]
    solution = spsolve(matrix.tocsr(), rhs)
    expected = img.copy()
    for (r, c), k in idx.items():
        expected[r, c] = solution[k]
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-8, atol=1e-9)
    noisy = noisy_linear_impute(image, removed, noise=0.05, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy[~removed.expand_as(noisy)], image[~removed.expand_as(image)])


def test_road_substrate_runs_batched() -> None:
    model = _cnn()
    x = torch.rand(2, 2, 6, 5, generator=torch.Generator().manual_seed(8))
    saliency = torch.rand(2, 1, 6, 5)
    result = deletion(model, x, saliency, substrate="road", step=5)
    with torch.no_grad():
        clean = model(x).softmax(1).max(1).values
    torch.testing.assert_close(result.curves[:, 0], clean)
    assert result.substrate == "road" and torch.isfinite(result.auc).all()


def test_bad_arguments_are_named() -> None:
    model = _cnn()
    x = torch.rand(2, 2, 6, 5)
    s = torch.rand(2, 1, 6, 5)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(model, x, s, mode="erase")
    with pytest.raises(ValueError, match="order"):
        deletion(model, x, s, order="best")
    with pytest.raises(ValueError, match="step"):
        deletion(model, x, s, step=0)
    with pytest.raises(ValueError, match="one channel"):
        deletion(model, x, torch.rand(2, 3, 6, 5))
    with pytest.raises(ValueError, match="N = 2"):
        deletion(model, x, torch.rand(3, 1, 6, 5))
    with pytest.raises(ValueError, match="unknown substrate"):
        deletion(model, x, s, substrate="noise")
    with pytest.raises(TypeError, match="explainer"):
        deletion(model, x, "gradcam")
