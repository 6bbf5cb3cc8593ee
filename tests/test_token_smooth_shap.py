"""SmoothGrad (noise in embedding space) and GradientSHAP with ``layer=``: per-token scores (N, L), the
full (N, L, D), padding exactly zero; closed forms on a linear embedding-bag model and a hand loop
over BERT's inputs_embeds with the same draws (Captum's NoiseTunnel / LayerGradientShap draw their
own noise, so they cannot be matched draw for draw)."""

from __future__ import annotations

import pytest
import torch

from bbdecoder import Gradient, GradientSHAP, InputXGradient, IntegratedGradients, SmoothGrad
from bbdecoder.hooks import count_hooks
from tests.test_token_attribution import bag_model, bert_batch, relative_error, tiny_bert, token_batch


def _pad_is_zero(result: torch.Tensor, mask: torch.Tensor) -> bool:
    return bool((result[mask == 0] == 0).all())


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_at_a_named_layer_equals_the_closed_form(kind: str) -> None:
    model = bag_model(masked=False)  # the mean reads the padding: its gradient there is not zero
    batch = token_batch()
    mask = batch["attention_mask"]
    smoother = SmoothGrad(
        InputXGradient(model), n_samples=5, noise_level=0.2, kind=kind, seed=3, layer="embed"
    )
    e = model.embed(batch["input_ids"]).detach()
    copies = torch.stack(smoother.noisy_copies(e))  # (S, N, L, D), the draws SmoothGrad makes
    grad = (model.head.weight[1] / 5).detach()  # d logit_1 / d e_l for a mean over 5 tokens
    values = copies * grad
    closed = {
        "smoothgrad": values.mean(0),
        "smoothgrad_sq": (values**2).mean(0),
        "vargrad": values.var(0, unbiased=False),
    }[kind]
    closed = torch.where(mask[..., None] != 0, closed, 0.0)
    full = smoother.attribute(batch, 1)
    assert full.shape == (3, 5, 6)
    torch.testing.assert_close(full, closed, rtol=1e-10, atol=1e-13)
    scores = smoother.token_scores(batch, 1)
    assert scores.shape == (3, 5)
    torch.testing.assert_close(scores, closed.sum(2), rtol=1e-10, atol=1e-13)
    assert _pad_is_zero(scores, mask) and _pad_is_zero(full, mask)
    assert bool((scores[mask != 0] != 0).all())


def test_smoothgrad_layer_with_a_bare_model_ids_and_the_inner_explainer_unchanged() -> None:
    model = bag_model(masked=False)
    batch = token_batch()
    # Gradient of a linear model is constant: SmoothGrad of it is the gradient (pads 0), also for ids
    smooth = SmoothGrad(model, n_samples=3, noise_level=0.5, layer=model.embed)
    expected = Gradient(model, layer="embed").attribute(batch, 2)
    torch.testing.assert_close(smooth.attribute(batch, 2), expected, rtol=1e-12, atol=1e-14)
    ids_only = SmoothGrad(model, n_samples=3, layer="embed").token_scores(batch["input_ids"], 2)
    assert ids_only.shape == (3, 5)
    inner = InputXGradient(model)
    SmoothGrad(inner, layer="embed")
    assert inner.attribution_layer is None  # a copy was moved to the layer
    with pytest.raises(ValueError, match="another layer"):
        SmoothGrad(InputXGradient(model, layer="embed"), layer="head")
    assert count_hooks(model) == 0


def test_smoothgrad_at_bert_word_embeddings_equals_a_hand_loop_over_inputs_embeds() -> None:
    model = tiny_bert()
    batch = bert_batch()
    layer = "bert.embeddings.word_embeddings"
    smoother = SmoothGrad(model, n_samples=3, noise_level=0.1, seed=5, layer=layer)
    ours = smoother.attribute(batch, 2)
    embed = model.bert.embeddings.word_embeddings
    e = embed(batch["input_ids"]).detach()
    grads = []
    for noisy in smoother.noisy_copies(e):
        point = noisy.clone().requires_grad_(True)
        logits = model(
            inputs_embeds=point,
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits
        (grad,) = torch.autograd.grad(logits[:, 2].sum(), point)
        grads.append(grad)
    expected = torch.stack(grads).mean(0)
    keep = batch["attention_mask"].bool()
    assert relative_error(ours[keep], expected[keep]) < 1e-10
    assert bool((ours[~keep] == 0).all())
    scores = smoother.token_scores(batch, 2)
    assert scores.shape == (3, 8) and bool((scores[~keep] == 0).all())


@pytest.mark.parametrize("stdevs", [0.0, 0.3])
def test_gradient_shap_at_a_named_layer_equals_the_closed_form(stdevs: float) -> None:
    model = bag_model(masked=False)
    batch = token_batch()
    mask = batch["attention_mask"]
    references = torch.tensor([[2] * 5, [6] * 5])
    n, n_samples, target = 3, 4, 0
    explainer = GradientSHAP(model, seed=11, layer="embed")
    full = explainer.attribute(
        batch,
        target,
        baselines=references,
        n_samples=n_samples,
        stdevs=stdevs,
        internal_batch_size=n * n_samples,
    )
    # The same draws in the same order (draw j is shared by the samples: its reference, its path point,
    # then its noise of one sample's shape); the gradient of the linear model is w / 5 everywhere.
    generator = torch.Generator().manual_seed(11)
    choice = torch.randint(2, (n_samples,), generator=generator)
    torch.rand(n_samples, generator=generator, dtype=torch.float64)  # the path points (unused: linear)
    sample = torch.arange(n * n_samples) % n
    draw = torch.arange(n * n_samples) // n
    x = model.embed(batch["input_ids"]).detach()[sample]
    if stdevs > 0:
        shape = (1, *x.shape[1:])
        noise = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(n_samples)]
        x = x + stdevs * torch.cat(noise)[draw]
    base = model.embed(references).detach()[choice[draw]]
    grad = (model.head.weight[target] / 5).detach()
    closed = torch.zeros(n, 5, 6, dtype=torch.float64).index_add_(0, sample, (x - base) * grad) / n_samples
    closed = torch.where(mask[..., None] != 0, closed, 0.0)
    torch.testing.assert_close(full, closed, rtol=1e-10, atol=1e-13)
    scores = explainer.token_scores(
        batch,
        target,
        baselines=references,
        n_samples=n_samples,
        stdevs=stdevs,
        internal_batch_size=n * n_samples,
    )
    assert scores.shape == (3, 5)
    torch.testing.assert_close(scores, closed.sum(2), rtol=1e-10, atol=1e-13)
    assert _pad_is_zero(scores, mask) and bool((scores[mask != 0] != 0).all())


def test_gradient_shap_with_one_pad_reference_is_ig_in_expectation_on_the_linear_model() -> None:
    model = bag_model(masked=False)
    batch = token_batch()
    shap = GradientSHAP(model, layer="embed").token_scores(
        batch, 1, baselines="pad", n_samples=3, pad_token_id=0
    )
    ig = IntegratedGradients(model, layer="embed").token_scores(
        batch, 1, baseline="pad", pad_token_id=0, n_steps=2
    )
    torch.testing.assert_close(shap, ig, rtol=1e-12, atol=1e-13)
    assert _pad_is_zero(shap, batch["attention_mask"])


def test_token_smoothgrad_and_gradient_shap_of_a_batch_equal_its_rows_one_by_one() -> None:
    model = bag_model(masked=True)
    batch = token_batch()
    targets = [0, 1, 2]

    def rows(i: int) -> dict[str, torch.Tensor]:
        return {key: value[i : i + 1] for key, value in batch.items()}

    smoother = SmoothGrad(InputXGradient(model), n_samples=4, noise_level=0.3, seed=2, layer="embed")
    shap = GradientSHAP(model, seed=6, layer="embed")
    shap_options = {"baselines": torch.tensor([[2] * 5, [6] * 5]), "n_samples": 4, "stdevs": 0.2}
    for explain in (smoother.attribute, lambda b, t: shap.attribute(b, t, **shap_options)):
        together = explain(batch, targets)
        alone = torch.cat([explain(rows(i), [t]) for i, t in enumerate(targets)])
        torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)
        assert bool((together[batch["attention_mask"] != 0] != 0).all())
