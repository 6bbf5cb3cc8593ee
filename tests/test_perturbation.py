"""Occlusion, FeatureAblation, RISE, KernelSHAP, GradientSHAP against brute-force loops, exact Shapley
values, and Captum 0.9."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from bbdecoder import RISE, FeatureAblation, GradientSHAP, IntegratedGradients, KernelSHAP, Occlusion
from bbdecoder.hooks import count_hooks

from .nets import make_net


def _images(n: int = 3, size: int = 11, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _score(model: nn.Module, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[torch.arange(x.shape[0]), torch.tensor(target)]


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return make_net("resnet")  # float64, eval, random BN statistics


# -- Occlusion --------------------------------------------------------------------------------------
def brute_force_occlusion(
    model: nn.Module, x: torch.Tensor, target: list[int], window: tuple[int, int], stride: int, value: float
) -> torch.Tensor:
    total = torch.zeros_like(x)
    counts = torch.zeros_like(x[0])
    base = _score(model, x, target)
    h, w = x.shape[2:]
    for top in range(0, h - window[0] + stride, stride):
        for left in range(0, w - window[1] + stride, stride):
            if (top > 0 and top - stride + window[0] >= h) or (left > 0 and left - stride + window[1] >= w):
                continue  # the previous window already reached the border
            occluded = x.clone()
            occluded[:, :, top : top + window[0], left : left + window[1]] = value
            drop = base - _score(model, occluded, target)
            total[:, :, top : top + window[0], left : left + window[1]] += drop.view(-1, 1, 1, 1)
            counts[:, top : top + window[0], left : left + window[1]] += 1
    return total / counts


@pytest.mark.parametrize(("window", "stride"), [((4, 4), 3), ((3, 5), 2), ((11, 11), 1), ((2, 2), 2)])
def test_occlusion_equals_brute_force_and_captum(
    cnn: nn.Module, window: tuple[int, int], stride: int
) -> None:
    from captum.attr import Occlusion as CaptumOcclusion

    x, target = _images(), [0, 3, 1]
    ours = Occlusion(cnn, batch_size=7).attribute(
        x, target, sliding_window_shapes=window, strides=stride, baselines=0.5
    )
    oracle = brute_force_occlusion(cnn, x, target, window, stride, 0.5)
    torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-12)
    theirs = CaptumOcclusion(cnn).attribute(
        x, target=target, sliding_window_shapes=(3, *window), strides=(3, stride, stride), baselines=0.5
    )
    # Captum accumulates in float32 for float64 inputs
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_occlusion_per_channel_window_matches_captum(cnn: nn.Module) -> None:
    from captum.attr import Occlusion as CaptumOcclusion

    x = _images(n=2, size=8)
    ours = Occlusion(cnn).attribute(x, [1, 2], sliding_window_shapes=(1, 3, 3), strides=(1, 2, 2))
    theirs = CaptumOcclusion(cnn).attribute(
        x, target=[1, 2], sliding_window_shapes=(1, 3, 3), strides=(1, 2, 2)
    )
    # Captum accumulates in float32 for float64 inputs
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


# -- FeatureAblation ----------------------------------------------------------------------------------
def _superpixels(size: int = 11, cell: int = 4) -> torch.Tensor:
    rows = torch.arange(size) // cell
    return (rows[:, None] * math.ceil(size / cell) + rows[None, :]).view(1, 1, size, size)


def test_feature_ablation_equals_brute_force_and_captum(cnn: nn.Module) -> None:
    from captum.attr import FeatureAblation as CaptumFeatureAblation

    x, target = _images(), [2, 0, 4]
    mask = _superpixels()
    ours = FeatureAblation(cnn, batch_size=5).attribute(x, target, feature_mask=mask, baselines=0.25)
    base = _score(cnn, x, target)
    oracle = torch.zeros_like(x)
    for feature in range(int(mask.max()) + 1):
        where = (mask == feature).expand_as(x)
        ablated = torch.where(where, torch.full_like(x, 0.25), x)
        oracle += where * (base - _score(cnn, ablated, target)).view(-1, 1, 1, 1)
    torch.testing.assert_close(ours, oracle, rtol=1e-10, atol=1e-12)
    theirs = CaptumFeatureAblation(cnn).attribute(x, target=target, feature_mask=mask, baselines=0.25)
    # Captum accumulates in float32 for float64 inputs
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)


def test_feature_ablation_default_mask_is_every_element() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    ours = FeatureAblation(model).attribute(x, 1)
    for i in range(5):
        ablated = x.clone()
        ablated[:, i] = 0
        torch.testing.assert_close(ours[:, i], _score(model, x, [1] * 4) - _score(model, ablated, [1] * 4))


# -- KernelSHAP ---------------------------------------------------------------------------------------
def exact_shapley(f: Callable[[torch.Tensor], torch.Tensor], m: int) -> torch.Tensor:
    """phi_i = sum_S |S|! (M - |S| - 1)! / M! (f(S + i) - f(S)), by enumeration; f takes (K, M) masks."""
    phi = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            for subset in itertools.combinations(others, size):
                without = torch.zeros(1, m, dtype=torch.bool)
                without[0, list(subset)] = True
                with_i = without.clone()
                with_i[0, i] = True
                weight = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                phi[i] += weight * float(f(with_i) - f(without))
    return phi


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_kernel_shap_is_exact_shapley_with_all_coalitions(m: int) -> None:
    torch.manual_seed(m)
    model = nn.Sequential(
        nn.Linear(m, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()
    x = torch.randn(2, m, dtype=torch.float64)
    baseline = torch.randn(1, m, dtype=torch.float64)
    explainer = KernelSHAP(model)
    ours = explainer.attribute(x, [2, 0], baselines=baseline, n_samples=2**m)
    assert explainer.last_exact
    for i, cls in enumerate([2, 0]):

        def f(z: torch.Tensor, i: int = i, cls: int = cls) -> torch.Tensor:
            with torch.no_grad():
                return model(torch.where(z, x[i], baseline))[:, cls]

        torch.testing.assert_close(ours[i], exact_shapley(f, m), rtol=1e-9, atol=1e-10)


def test_kernel_shap_on_image_patches_is_exact_and_sampling_converges(cnn: nn.Module) -> None:
    x, mask = _images(n=2, size=8), _superpixels(8, 4)  # 4 patch features
    exact = KernelSHAP(cnn).attribute(x, [1, 3], feature_mask=mask, n_samples=100)
    per_feature = torch.stack(
        [exact[:, 0][mask[0, 0].expand(2, 8, 8) == f].view(2, -1)[:, 0] for f in range(4)], 1
    )
    # efficiency: the values add up to F(x) - F(baseline)
    gap = _score(cnn, x, [1, 3]) - _score(cnn, torch.zeros_like(x), [1, 3])
    torch.testing.assert_close(per_feature.sum(1), gap, rtol=1e-9, atol=1e-10)
    sampled_explainer = KernelSHAP(cnn, seed=3)
    sampled = sampled_explainer.attribute(x, [1, 3], feature_mask=mask, n_samples=13)
    assert not sampled_explainer.last_exact
    assert (sampled - exact).abs().max() < 0.5 * exact.abs().max()
    torch.testing.assert_close(
        sampled.sum(dim=(1, 2, 3)) / 3, exact.sum(dim=(1, 2, 3)) / 3
    )  # efficiency holds


def test_kernel_shap_refuses_too_many_features(cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match="feature_mask"):
        KernelSHAP(cnn).attribute(torch.rand(1, 3, 40, 40, dtype=torch.float64))


# -- GradientSHAP -------------------------------------------------------------------------------------
def test_gradient_shap_converges_to_mean_ig_and_agrees_with_captum() -> None:
    from captum.attr import GradientShap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.Softplus(), nn.Linear(12, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    references = torch.randn(3, 4, dtype=torch.float64)
    oracle = torch.stack(
        [
            IntegratedGradients(model).attribute(
                x, [0, 2], baseline=b[None], n_steps=200, method="gausslegendre"
            )
            for b in references
        ]
    ).mean(0)
    ours = GradientSHAP(model, seed=1).attribute(
        x, [0, 2], baselines=references, n_samples=6000, internal_batch_size=997
    )
    torch.testing.assert_close(ours, oracle, rtol=0, atol=0.03 * float(oracle.abs().max()))
    torch.manual_seed(1)
    theirs = GradientShap(model).attribute(x, baselines=references, target=[0, 2], n_samples=6000)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.04 * float(oracle.abs().max()))
    # a linear model with one baseline and no noise: exactly (x - b) * w for any draws
    linear = nn.Linear(4, 3).double()
    exact = GradientSHAP(linear).attribute(x, 1, baselines=references[:1], n_samples=3)
    torch.testing.assert_close(
        exact, (x - references[:1]) * linear.weight[1].detach(), rtol=1e-12, atol=1e-12
    )


def _gradient_shap_loop(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[int],
    refs: torch.Tensor,
    n_samples: int,
    stdevs: float,
    seed: int,
) -> torch.Tensor:
    """Sample by sample, draw by draw: draw j's reference index, path point and noise (1, *sample_shape)
    from one generator in the documented order (indices, path points, then the noise of draw 0, 1, ...)."""
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(refs.shape[0], (n_samples,), generator=generator)
    alphas = torch.rand(n_samples, generator=generator, dtype=torch.float64)
    shape = (1, *x.shape[1:])
    noise = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(n_samples)]
    out = torch.zeros_like(x)
    for i, target in enumerate(targets):
        for j in range(n_samples):
            noisy = x[i : i + 1] + stdevs * noise[j]
            base = refs[choice[j]][None]
            point = (base + alphas[j] * (noisy - base)).requires_grad_(True)
            (grad,) = torch.autograd.grad(model(point)[0, target], point)
            out[i] += ((noisy - base) * grad)[0] / n_samples
    return out


def test_gradient_shap_equals_the_loop_over_its_draws_and_a_batch_its_samples(cnn: nn.Module) -> None:
    x = _images(n=3, size=8)
    refs = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    explainer = GradientSHAP(cnn, seed=4)
    ours = explainer.attribute(x, [0, 1, 2], baselines=refs, n_samples=6, stdevs=0.2, internal_batch_size=4)
    expected = _gradient_shap_loop(cnn.eval(), x, [0, 1, 2], refs, 6, 0.2, 4)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    options = {"baselines": refs, "n_samples": 6, "stdevs": 0.2, "internal_batch_size": 5}
    alone = torch.cat([explainer.attribute(x[i : i + 1], [t], **options) for i, t in enumerate([0, 1, 2])])
    torch.testing.assert_close(ours, alone, rtol=1e-12, atol=1e-14)


def test_gradient_shap_noise_and_chunking_do_not_change_draws(cnn: nn.Module) -> None:
    x = _images(n=2, size=8)
    refs = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    a = GradientSHAP(cnn, seed=2).attribute(
        x, [0, 1], baselines=refs, n_samples=5, stdevs=0.1, internal_batch_size=3
    )
    b = GradientSHAP(cnn, seed=2).attribute(
        x, [0, 1], baselines=refs, n_samples=5, stdevs=0.1, internal_batch_size=10
    )
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- RISE ---------------------------------------------------------------------------------------------
def test_rise_equals_the_loop_over_its_masks(cnn: nn.Module) -> None:
    x, target = _images(n=2, size=12), [1, 4]
    explainer = RISE(cnn, n_masks=37, grid_size=3, p=0.4, seed=7, batch_size=10)
    ours = explainer.saliency(x, target)
    masks = explainer.masks(0, 37, (12, 12))
    assert masks.shape == (37, 1, 12, 12) and float(masks.min()) >= 0 and float(masks.max()) <= 1
    oracle = torch.zeros(2, 1, 12, 12, dtype=torch.float64)
    for mask in masks:
        with torch.no_grad():
            probabilities = cnn(x * mask).softmax(1)[torch.arange(2), torch.tensor(target)]
        oracle += probabilities.view(2, 1, 1, 1) * mask
    torch.testing.assert_close(ours, oracle / (0.4 * 37), rtol=1e-10, atol=1e-12)
    # other batch sizes, the same seed: the same masks, the same map
    torch.testing.assert_close(
        RISE(cnn, n_masks=37, grid_size=3, p=0.4, seed=7, batch_size=3).saliency(x, target), ours
    )
    assert not torch.equal(RISE(cnn, n_masks=37, grid_size=3, p=0.4, seed=8).saliency(x, target), ours)
    assert explainer.attribute(x, target).shape == x.shape


# -- shared contract ------------------------------------------------------------------------------------
METHODS: dict[str, Callable[[nn.Module], Callable[..., torch.Tensor]]] = {
    "occlusion": lambda m: lambda x, t: Occlusion(m).attribute(x, t, sliding_window_shapes=3, strides=2),
    "feature_ablation": lambda m: (
        lambda x, t: FeatureAblation(m).attribute(x, t, feature_mask=_superpixels(8, 3))
    ),
    "rise": lambda m: lambda x, t: RISE(m, n_masks=20, grid_size=2).attribute(x, t),
    "kernel_shap": lambda m: lambda x, t: KernelSHAP(m).attribute(x, t, feature_mask=_superpixels(8, 4)),
    "gradient_shap": lambda m: (
        lambda x, t: GradientSHAP(m).attribute(x, t, baselines=torch.zeros(2, 3, 8, 8), n_samples=3)
    ),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_equals_one_by_one_and_no_trace(name: str) -> None:
    model = make_net("resnet", dtype=torch.float32).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = [0, 4, 2]
    explain = METHODS[name](model)
    batch = explain(x, target)
    assert batch.shape == x.shape
    if name != "gradient_shap":  # its draws are per row of the batch
        for i in range(3):
            torch.testing.assert_close(
                batch[i : i + 1], explain(x[i : i + 1], target[i]), rtol=1e-5, atol=1e-6
            )
    torch.testing.assert_close(explain(x, target), batch, rtol=0, atol=0)  # deterministic
    assert count_hooks(model) == 0 and model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", sorted(METHODS))
def test_saliency_shape_and_input_checks(name: str) -> None:
    model = make_net("resnet", dtype=torch.float32)
    explainer: Any = {
        "occlusion": Occlusion,
        "feature_ablation": FeatureAblation,
        "rise": lambda m: RISE(m, n_masks=4),
        "kernel_shap": KernelSHAP,
        "gradient_shap": GradientSHAP,
    }[name](model)
    with pytest.raises(ValueError, match="unsqueeze"):
        explainer.attribute(torch.rand(3, 8, 8))
    if name in ("rise", "gradient_shap"):
        maps = explainer.saliency(torch.rand(2, 3, 8, 8), 1)
        assert maps.shape == (2, 1, 8, 8) and float(maps.min()) >= 0


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str], cnn: nn.Module) -> None:
    x = _images(n=1, size=8)
    Occlusion(cnn, batch_size=2).attribute(x, 0, sliding_window_shapes=2)
    assert "Occlusion" not in capsys.readouterr().err  # not a terminal: silent
    Occlusion(cnn, batch_size=2, progress=True).attribute(x, 0, sliding_window_shapes=2)
    assert "Occlusion: windows" in capsys.readouterr().err


def test_callable_target_scores_every_row(cnn: nn.Module) -> None:
    x = _images(n=2, size=8)
    by_class = FeatureAblation(cnn).attribute(x, [3, 3], feature_mask=_superpixels(8, 4))
    by_callable = FeatureAblation(cnn).attribute(x, lambda out: out[:, 3], feature_mask=_superpixels(8, 4))
    torch.testing.assert_close(by_callable, by_class, rtol=0, atol=0)
