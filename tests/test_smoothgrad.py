"""SmoothGrad around any explainer: against a brute-force loop over the same noise, kinds, seeds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from bbdecoder.attribution import (
    Explainer,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
)
from bbdecoder.hooks import count_hooks


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.Softplus(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * 6 * 6, 5),
    ).double()


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 6, 6, generator=generator, dtype=torch.float64)
    return x * torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64).view(3, 1, 1, 1)  # different ranges


def brute_force(
    explain: Callable[..., torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    n: int,
    level: float,
    seed: int,
    kind: str,
    **kwargs: object,
) -> torch.Tensor:
    """One noisy copy at a time, drawn from the same generator in the same order (one standard normal
    of one sample's shape per copy, shared by the samples); reduced with stack."""
    generator = torch.Generator().manual_seed(seed)
    value_range = x.flatten(1).max(dim=1).values - x.flatten(1).min(dim=1).values
    sigma = (level * value_range).view(-1, 1, 1, 1)
    results = []
    for _ in range(n):
        noisy = x + sigma * torch.randn((1, *x.shape[1:]), generator=generator, dtype=x.dtype)
        results.append(explain(noisy, target, **kwargs))
    stacked = torch.stack(results)
    if kind == "smoothgrad":
        return stacked.mean(dim=0)
    if kind == "smoothgrad_sq":
        return (stacked**2).mean(dim=0)
    return stacked.var(dim=0, unbiased=False)


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("batch", [None, 3, 7, 100])
def test_matches_brute_force_loop(images: torch.Tensor, kind: str, batch: int | None) -> None:
    model = small_cnn()
    smooth = SmoothGrad(model, n_samples=6, noise_level=0.2, kind=kind, seed=11, internal_batch_size=batch)
    ours = smooth.attribute(images)
    clean_argmax = model.eval()(images).argmax(dim=1)
    expected = brute_force(Gradient(model).attribute, images, clean_argmax, 6, 0.2, 11, kind)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(ours, Gradient(model).attribute(images) ** (2 if kind != "smoothgrad" else 1))


@pytest.mark.parametrize("inner_class", [InputXGradient, IntegratedGradients])
def test_wraps_other_explainers(images: torch.Tensor, inner_class: type[Explainer]) -> None:
    model = small_cnn()
    inner = inner_class(model)
    kwargs = {"n_steps": 5} if inner_class is IntegratedGradients else {}
    ours = SmoothGrad(inner, n_samples=4, noise_level=0.1, seed=2).attribute(images, [1, 2, 3], **kwargs)
    target = torch.tensor([1, 2, 3])
    expected = brute_force(inner.attribute, images, target, 4, 0.1, 2, "smoothgrad", **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_saliency_averages_the_inner_saliency(images: torch.Tensor) -> None:
    model = small_cnn()
    inner = IntegratedGradients(model)
    ours = SmoothGrad(inner, n_samples=3, noise_level=0.3, seed=4).saliency(images, 0, n_steps=4)
    target = torch.tensor([0, 0, 0])
    expected = brute_force(inner.saliency, images, target, 3, 0.3, 4, "smoothgrad", n_steps=4)
    assert ours.shape == (3, 1, 6, 6)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_wraps_fullgrad_saliency(images: torch.Tensor) -> None:
    from bbdecoder.attribution.fullgrad import FullGrad

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    model = model.double()
    inner = FullGrad(model, im_size=(3, 6, 6))
    ours = SmoothGrad(inner, n_samples=3, noise_level=0.1, seed=1).saliency(images, 2)
    expected = brute_force(inner.saliency, images, torch.tensor([2, 2, 2]), 3, 0.1, 1, "smoothgrad")
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_linear_model_gives_the_gradient_exactly() -> None:
    torch.manual_seed(3)
    model = nn.Linear(10, 4).double()
    x = torch.randn(5, 10, dtype=torch.float64)
    weight = model.weight.detach()
    mean = SmoothGrad(model, n_samples=9, noise_level=0.5).attribute(x, 2)
    torch.testing.assert_close(mean, weight[2].expand(5, 10), rtol=0, atol=1e-15)
    square = SmoothGrad(model, n_samples=9, noise_level=0.5, kind="smoothgrad_sq").attribute(x, 2)
    torch.testing.assert_close(square, (weight[2] ** 2).expand(5, 10), rtol=0, atol=1e-15)
    variance = SmoothGrad(model, n_samples=9, noise_level=0.5, kind="vargrad").attribute(x, 2)
    assert torch.equal(variance, torch.zeros_like(x))


def test_none_target_is_frozen_on_the_clean_input() -> None:
    # Two logits equal to the two features: the arg-max flips under noise near the tie.
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.99], [0.0, 0.01]], dtype=torch.float64)
    smooth = SmoothGrad(model, n_samples=20, noise_level=0.5, seed=0)
    identity = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(smooth.attribute(x), identity, rtol=0, atol=1e-15)
    per_copy = torch.stack([Gradient(model).attribute(noisy) for noisy in smooth.noisy_copies(x)]).mean(0)
    assert not torch.allclose(per_copy, identity), "noise does flip the arg-max"


def test_seeded_and_reproducible(images: torch.Tensor) -> None:
    model = small_cnn()
    first = SmoothGrad(model, n_samples=4, seed=7).attribute(images)
    again = SmoothGrad(model, n_samples=4, seed=7, internal_batch_size=3).attribute(images)
    other = SmoothGrad(model, n_samples=4, seed=8).attribute(images)
    assert torch.equal(first, again) or torch.allclose(first, again, rtol=0, atol=1e-14)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("kind", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("batch", [None, 1, 4])
def test_a_batch_equals_its_samples_one_by_one(images: torch.Tensor, kind: str, batch: int | None) -> None:
    model = small_cnn()
    smooth = SmoothGrad(model, n_samples=5, noise_level=0.2, kind=kind, seed=3, internal_batch_size=batch)
    together = smooth.attribute(images, [0, 1, 4])
    alone = torch.cat([smooth.attribute(images[i : i + 1], [t]) for i, t in enumerate([0, 1, 4])])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)
    # the last sample in a batch of two gets the noise it gets alone and first in a batch of three
    pair = smooth.noisy_copies(images[1:])
    for k, copy in enumerate(smooth.noisy_copies(images[2:])):
        torch.testing.assert_close(copy[0], pair[k][1], rtol=0, atol=0)


def test_noise_is_scaled_by_each_sample_range() -> None:
    x = torch.stack([torch.linspace(0, 1, 400), torch.linspace(0, 100, 400)]).view(2, 1, 20, 20)
    copies = SmoothGrad(nn.Flatten(), n_samples=50, noise_level=0.1).noisy_copies(x)
    noise = torch.stack([c - x for c in copies])
    std = noise.transpose(0, 1).flatten(1).std(dim=1)
    torch.testing.assert_close(std, torch.tensor([0.1, 10.0]), rtol=0.02, atol=0)


def test_batches_copies_in_eval_mode_and_one_at_a_time_otherwise(images: torch.Tensor) -> None:
    model = small_cnn()
    rows: list[int] = []
    handle = model.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    try:
        SmoothGrad(model, n_samples=5, internal_batch_size=7).attribute(images, 0)
        assert rows[1:] == [6, 6, 3]  # after the clean forward that freezes the target
        rows.clear()
        train_mode = Gradient(model, eval_mode=False)
        SmoothGrad(train_mode, n_samples=3, internal_batch_size=100).attribute(images, 0)
        assert rows[1:] == [3, 3, 3]
    finally:
        handle.remove()


def test_model_untouched(images: torch.Tensor) -> None:
    model = small_cnn().train()
    model[1].eval()
    model[3].weight.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    SmoothGrad(IntegratedGradients(model), n_samples=3).attribute(images, n_steps=4)
    SmoothGrad(model, n_samples=3).saliency(images)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert count_hooks(model) == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_argument_errors(images: torch.Tensor) -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match="unknown SmoothGrad kind 'var'"):
        SmoothGrad(model, kind="var")
    with pytest.raises(ValueError, match="n_samples"):
        SmoothGrad(model, n_samples=0)
    with pytest.raises(ValueError, match="noise_level"):
        SmoothGrad(model, noise_level=-0.1)
    with pytest.raises(ValueError, match="internal_batch_size"):
        SmoothGrad(model, internal_batch_size=0)
    with pytest.raises(TypeError, match=r"Explainer or an nn\.Module"):
        SmoothGrad(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="return_convergence_delta"):
        SmoothGrad(IntegratedGradients(model), n_samples=2).attribute(images, return_convergence_delta=True)
    with pytest.raises(ValueError, match="unsqueeze"):
        SmoothGrad(model).attribute(torch.rand(6))
