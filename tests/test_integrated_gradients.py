"""Integrated Gradients, its quadrature rules and baselines: exact oracles, Captum, chunking, memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from scipy.ndimage import gaussian_filter
from torch import nn

from bbdecoder.attribution import IntegratedGradients, Normalize, make_baseline, quadrature
from bbdecoder.attribution.baselines import gaussian_blur
from bbdecoder.attribution.memory import GRAD_MEMORY_FACTOR
from bbdecoder.hooks import count_hooks
from bbdecoder.targets import TargetError

METHODS = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]


def smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)
    ).double()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


class PolynomialNet(nn.Module):
    """A cubic per pixel, summed per row: only exactly rounded + and * and per-row sums.

    Its gradient rows cannot depend on the batch size (no BLAS blocking, no vectorised transcendental
    function whose tail handling could differ), so chunking must not change a single bit.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.scale = nn.Parameter(torch.randn(3, 3, 6, 6, generator=generator, dtype=torch.float64))
        self.shift = nn.Parameter(torch.randn(3, 3, 6, 6, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x[:, None] * self.scale + self.shift  # (N, classes, C, H, W)
        return (hidden * hidden * (1.0 - 0.3 * hidden)).flatten(2).sum(dim=2)


class RowCounter:
    """Forward hook recording how many rows each forward pass of the model sees."""

    def __init__(self, model: nn.Module) -> None:
        self.rows: list[int] = []
        self.handle = model.register_forward_hook(lambda _m, args, _o: self.rows.append(args[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


# -- quadrature -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 3, 10, 50])
def test_quadrature_weights_sum_to_one(method: str, n: int) -> None:
    alphas, weights = quadrature(method, n)
    assert alphas.dtype == weights.dtype == torch.float64
    assert alphas.shape == weights.shape == (n,)
    assert abs(weights.sum().item() - 1.0) < 1e-14
    assert (alphas >= 0).all() and (alphas <= 1).all()
    assert (weights > 0).all()


def test_quadrature_nodes() -> None:
    alphas, weights = quadrature("riemann_trapezoid", 5)
    torch.testing.assert_close(alphas, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([0.125, 0.25, 0.25, 0.25, 0.125], dtype=torch.float64))
    torch.testing.assert_close(quadrature("riemann_left", 4)[0], torch.tensor([0, 0.25, 0.5, 0.75]).double())
    torch.testing.assert_close(quadrature("riemann_right", 4)[0], torch.tensor([0.25, 0.5, 0.75, 1]).double())
    middle = torch.tensor([0.125, 0.375, 0.625, 0.875]).double()
    torch.testing.assert_close(quadrature("riemann_middle", 4)[0], middle)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_gauss_legendre_exact_for_polynomials_up_to_degree_2n_minus_1(n: int) -> None:
    alphas, weights = quadrature("gausslegendre", n)
    for degree in range(2 * n):
        assert abs(float((weights * alphas**degree).sum()) - 1 / (degree + 1)) < 1e-14


def test_quadrature_errors() -> None:
    with pytest.raises(ValueError, match="unknown quadrature method 'simpson'"):
        quadrature("simpson", 10)
    with pytest.raises(ValueError, match="n_steps >= 2"):
        quadrature("riemann_trapezoid", 1)
    with pytest.raises(ValueError, match="n_steps >= 1"):
        quadrature("gausslegendre", 0)
    with pytest.raises(TypeError, match="n_steps must be an int"):
        quadrature("riemann_left", 2.5)  # type: ignore[arg-type]
    assert quadrature("riemann_left", 1)[1].tolist() == [1.0]


# -- baselines --------------------------------------------------------------------------------------
def test_constant_and_tensor_baselines() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(make_baseline("black", x), torch.zeros_like(x))
    assert torch.equal(make_baseline("white", x), torch.ones_like(x))
    assert torch.equal(make_baseline(0.5, x), torch.full_like(x, 0.5))
    per_channel = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    made = make_baseline(per_channel, x.double())
    assert made.shape == x.shape and made.dtype == torch.float64
    assert torch.equal(made[1, 2], torch.full((4, 4), 0.3, dtype=torch.float32).double())
    assert torch.equal(make_baseline(lambda t: t * 0.5, x), x * 0.5)


def test_baseline_errors() -> None:
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"shape \(5,\).*does not broadcast"):
        make_baseline(torch.zeros(5), x)
    with pytest.raises(ValueError, match="unknown baseline 'grey'"):
        make_baseline("grey", x)
    with pytest.raises(TypeError, match="bool"):
        make_baseline(True, x)
    with pytest.raises(ValueError, match="spatial dims"):
        make_baseline("blur", torch.rand(2, 5))
    with pytest.raises(ValueError, match="positive"):
        gaussian_blur(x, 0.0)


def test_uniform_baseline_is_seeded_and_within_each_sample_range() -> None:
    x = torch.stack([torch.rand(3, 8, 8) * 0.1, torch.rand(3, 8, 8) * 5 + 10])
    first, again, other = (make_baseline("uniform", x, seed) for seed in (3, 3, 4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    for i in range(2):
        assert first[i].min() >= x[i].min() and first[i].max() <= x[i].max()
    assert first[1].min() > 1.0, "each sample uses its own range"


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_blur_matches_scipy(sigma: float) -> None:
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    ours = gaussian_blur(x, sigma)
    theirs = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-12)
    assert torch.equal(make_baseline("blur", x, blur_sigma=sigma), ours)


def test_blur_keeps_constant_images_constant() -> None:
    x = torch.full((1, 2, 5, 5), 0.7, dtype=torch.float64)
    torch.testing.assert_close(make_baseline("blur", x, blur_sigma=4.0), x, rtol=0, atol=1e-15)


# -- exactness on affine models --------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("baseline", ["black", "white", 0.3, "uniform"])
def test_affine_model_exact_for_every_rule(method: str, baseline: object) -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 3).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    x_ref = make_baseline(baseline, x)  # type: ignore[arg-type]
    attr, delta = IntegratedGradients(model).attribute(
        x,
        [0, 2, 1, 1],
        baseline=baseline,
        n_steps=7,
        method=method,
        return_convergence_delta=True,  # type: ignore[arg-type]
    )
    expected = (x - x_ref) * model.weight.detach()[[0, 2, 1, 1]]
    torch.testing.assert_close(attr, expected, rtol=0, atol=1e-12)
    assert delta.abs().max() < 1e-12


def test_input_transform_applies_the_chain_rule() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3 * 2 * 2, 2).double()
    net = nn.Sequential(nn.Flatten(), model)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.5, 2.0])
    x = torch.rand(3, 3, 2, 2, dtype=torch.float64)
    attr = IntegratedGradients(net, input_transform=Normalize(mean, std)).attribute(x, 1, n_steps=5)
    weight = model.weight.detach()[1].view(3, 2, 2)
    expected = x * weight / std.double().view(3, 1, 1)  # black baseline: x - 0 = x
    torch.testing.assert_close(attr, expected, rtol=0, atol=1e-12)


def test_input_transform_equals_composed_model() -> None:
    model = small_cnn().double()
    normalize = Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    kwargs = {"n_steps": 9, "method": "gausslegendre"}
    ours = IntegratedGradients(model, input_transform=normalize).attribute(x, 2, **kwargs)  # type: ignore[arg-type]
    composed = IntegratedGradients(nn.Sequential(normalize, model)).attribute(x, 2, **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, composed, rtol=0, atol=1e-13)


# -- convergence ------------------------------------------------------------------------------------
def _max_delta(model: nn.Module, x: torch.Tensor, method: str, n: int) -> float:
    ig = IntegratedGradients(model)
    _, delta = ig.attribute(x, 0, n_steps=n, method=method, return_convergence_delta=True)
    return float(delta.abs().max())


def test_delta_is_sum_minus_output_difference() -> None:
    model = smooth_mlp()
    x = torch.randn(4, 6, dtype=torch.float64) * 2
    ig = IntegratedGradients(model)
    attr, delta = ig.attribute(x, 1, baseline=0.2, n_steps=6, return_convergence_delta=True)
    with torch.no_grad():
        gap = model(x)[:, 1] - model(torch.full_like(x, 0.2))[:, 1]
    torch.testing.assert_close(delta, attr.sum(dim=1) - gap, rtol=0, atol=1e-14)
    assert delta.abs().min() > 1e-8, "6 trapezoid steps on a curved net leave a visible error"


def test_delta_shrinks_with_steps_and_fastest_with_gauss_legendre() -> None:
    model = smooth_mlp()
    x = torch.randn(4, 6, dtype=torch.float64) * 2
    steps = [4, 8, 16, 32]
    trapezoid = [_max_delta(model, x, "riemann_trapezoid", n) for n in steps]
    left = [_max_delta(model, x, "riemann_left", n) for n in steps]
    gauss = [_max_delta(model, x, "gausslegendre", n) for n in steps]
    for coarse, fine in itertools.pairwise(trapezoid):
        assert fine < coarse / 3, trapezoid  # second order: about / 4 per doubling
    for coarse, fine in itertools.pairwise(left):
        assert fine < coarse / 1.8, left  # first order: about / 2 per doubling
    assert gauss[1] < trapezoid[-1] / 100, (gauss, trapezoid)
    assert gauss[2] < 1e-12


# -- Captum ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre"])
def test_matches_captum(method: str) -> None:
    model = small_cnn().eval()
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    baseline = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    ours = IntegratedGradients(model).attribute(x, [0, 3, 1], baseline=baseline, n_steps=20, method=method)
    theirs = CaptumIG(model).attribute(x, baselines=baseline, target=[0, 3, 1], n_steps=20, method=method)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_captum_trapezoid_is_short_by_n_minus_1_over_n() -> None:
    n = 10
    model = small_cnn().eval()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = IntegratedGradients(model).attribute(x, 1, n_steps=n, method="riemann_trapezoid")
    theirs = CaptumIG(model).attribute(x, target=1, n_steps=n, method="riemann_trapezoid")
    torch.testing.assert_close(theirs, ours * (n - 1) / n, rtol=0, atol=1e-6)
    assert (theirs - ours).abs().max() > 1e-3

    affine = nn.Linear(5, 2).double()
    z = torch.randn(3, 5, dtype=torch.float64)
    exact = z * affine.weight.detach()[0]
    ours_affine = IntegratedGradients(affine).attribute(z, 0, n_steps=n)
    torch.testing.assert_close(ours_affine, exact, rtol=0, atol=1e-12)
    captum_affine = CaptumIG(affine).attribute(z, target=0, n_steps=n, method="riemann_trapezoid")
    # Captum builds its nodes with a float32 linspace, hence 1e-7 rather than 1e-12.
    torch.testing.assert_close(captum_affine, exact * (n - 1) / n, rtol=0, atol=1e-7)
    assert (captum_affine - exact).abs().max() > 1e-3


# -- targets -----------------------------------------------------------------------------------------
def test_per_sample_targets_match_one_by_one() -> None:
    model = smooth_mlp()
    x = torch.randn(3, 6, dtype=torch.float64)
    ig = IntegratedGradients(model)
    batched = ig.attribute(x, torch.tensor([2, 0, 1]), n_steps=8, internal_batch_size=5)
    singles = torch.cat([ig.attribute(x[i : i + 1], c, n_steps=8) for i, c in enumerate([2, 0, 1])])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-14)


def test_none_target_uses_the_clean_argmax_and_callable_targets_work() -> None:
    model = smooth_mlp()
    x = torch.randn(4, 6, dtype=torch.float64)
    ig = IntegratedGradients(model)
    argmax = model(x).argmax(dim=1)
    assert torch.equal(ig.attribute(x, None, n_steps=6), ig.attribute(x, argmax, n_steps=6))
    via_callable = ig.attribute(x, lambda out: out[:, 1] - out[:, 0], n_steps=6)
    difference = ig.attribute(x, 1, n_steps=6) - ig.attribute(x, 0, n_steps=6)
    torch.testing.assert_close(via_callable, difference, rtol=0, atol=1e-13)


def test_target_errors() -> None:
    model = smooth_mlp()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(TargetError, match=r"2 targets .* batch of 4"):
        IntegratedGradients(model).attribute(x, [0, 1], internal_batch_size=3)
    with pytest.raises(TargetError, match="out of range"):
        IntegratedGradients(model).attribute(x, [0, 1, 2, 3], internal_batch_size=3)


def test_argument_errors() -> None:
    model = smooth_mlp()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="internal_batch_size"):
        IntegratedGradients(model).attribute(x, 0, internal_batch_size=0)
    with pytest.raises(ValueError, match="unknown quadrature method"):
        IntegratedGradients(model).attribute(x, 0, method="trapezoid")
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        IntegratedGradients(model, memory_budget_bytes=-1)
    with pytest.raises(ValueError, match="unsqueeze"):
        IntegratedGradients(model).attribute(x[0], 0)


# -- chunking and memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 29])
def test_chunked_equals_unchunked_bitwise(chunk: int) -> None:
    model = PolynomialNet()
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    ig = IntegratedGradients(model)
    whole = ig.attribute(x, [0, 1, 2, 0], n_steps=12, method="gausslegendre", internal_batch_size=4 * 12)
    chunked = ig.attribute(x, [0, 1, 2, 0], n_steps=12, method="gausslegendre", internal_batch_size=chunk)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_chunked_equals_unchunked_with_blas_layers(chunk: int) -> None:
    # nn.Linear's BLAS blocking depends on the batch size: a row's gradient may move by ~1 ulp.
    model = smooth_mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    ig = IntegratedGradients(model)
    whole = ig.attribute(x, 1, n_steps=10, internal_batch_size=50)
    chunked = ig.attribute(x, 1, n_steps=10, internal_batch_size=chunk)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)


def test_rows_per_forward_never_exceed_internal_batch_size() -> None:
    model = small_cnn()
    counter = RowCounter(model)
    try:
        IntegratedGradients(model).attribute(
            torch.rand(3, 3, 6, 6), 1, n_steps=10, internal_batch_size=7, return_convergence_delta=True
        )
    finally:
        counter.close()
    assert max(counter.rows) == 7
    assert sum(counter.rows) == 3 * 10 + 3 + 3  # path rows + F(x) + F(baseline)


def test_default_batch_follows_the_memory_budget() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Tanh(), nn.Linear(50, 10))
    # float32 bytes of one row: input 100, Linear 50, Tanh 50, Linear 10, the model's output 10.
    per_row = int(4 * (100 + 50 + 50 + 10 + 10) * GRAD_MEMORY_FACTOR)
    budget = 11 * per_row + 5
    counter = RowCounter(model)
    try:
        IntegratedGradients(model, memory_budget_bytes=budget).attribute(torch.randn(4, 100), 0, n_steps=10)
    finally:
        counter.close()
    assert counter.rows[0] == 1, "a one-sample probe"
    assert max(counter.rows) == 11
    assert sum(counter.rows[1:]) == 40
    assert count_hooks(model) == 0


def test_saliency_is_abs_sum_over_channels() -> None:
    model = small_cnn()
    x = torch.rand(2, 3, 6, 6)
    ig = IntegratedGradients(model)
    saliency = ig.saliency(x, 1, n_steps=5)
    assert saliency.shape == (2, 1, 6, 6)
    torch.testing.assert_close(saliency, ig.attribute(x, 1, n_steps=5).abs().sum(dim=1, keepdim=True))


# -- the model is left as it was --------------------------------------------------------------------
def test_model_untouched() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(16, 3)
    ).train()
    model[0].bias.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 4, 4)
    first = IntegratedGradients(model).attribute(x, 0, n_steps=6)
    second = IntegratedGradients(model).attribute(x, 0, n_steps=6)
    assert torch.equal(first, second), "eval mode: BatchNorm uses running stats, dropout is off"
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert count_hooks(model) == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class FailsOnBigBatches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError("boom")
        return x.sum(dim=1, keepdim=True)


def test_no_hook_survives_a_failing_forward() -> None:
    model = nn.Sequential(nn.Linear(4, 4), FailsOnBigBatches()).train()
    with pytest.raises(RuntimeError, match="boom"):  # the one-row probe passes, the path batch fails
        IntegratedGradients(model).attribute(torch.randn(3, 4), 0, n_steps=4)
    assert count_hooks(model) == 0
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
