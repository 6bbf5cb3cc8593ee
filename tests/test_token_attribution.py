"""Token attribution at an embedding layer: exact oracles, Captum 0.9 equality, no model mutation."""

from __future__ import annotations

import collections

import pytest
import torch
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients
from torch import nn

from bbdecoder import Gradient, GradientSHAP, InputXGradient, IntegratedGradients, SmoothGrad
from bbdecoder.attribution.layer_attribution import LayerCallError
from bbdecoder.hooks import count_hooks
from bbdecoder.targets import TargetError

transformers = pytest.importorskip("transformers")

METHODS = ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]


class EmbeddingBagClassifier(nn.Module):
    """Embedding, masked mean over tokens, linear head: linear in the embeddings."""

    def __init__(self, vocab: int = 20, dim: int = 6, classes: int = 3, masked: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)
        self.masked = masked

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def pool(self, embedded: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or not self.masked:
            return embedded.mean(dim=1)
        mask = attention_mask.to(embedded.dtype)[..., None]
        return (embedded * mask).sum(dim=1) / mask.sum(dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pool(self.embed(input_ids), attention_mask))


def bag_model(masked: bool = True) -> EmbeddingBagClassifier:
    torch.manual_seed(0)
    return EmbeddingBagClassifier(masked=masked).double().eval()


def token_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 7, 1, 9, 4], [5, 2, 8, 0, 0], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": mask}


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double().eval()


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def bert_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 60, (3, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


# -- exact oracles on a linear model ------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_ig_equals_closed_form_on_embedding_bag(method: str) -> None:
    model = bag_model()
    batch = token_batch()
    baseline = torch.tensor([[2, 2, 2, 2, 2]])
    target = torch.tensor([0, 2, 1])
    attribution = IntegratedGradients(model).attribute(
        batch, target, baseline=baseline, n_steps=7, method=method
    )
    scores = IntegratedGradients(model).token_scores(
        batch, target, baseline=baseline, n_steps=7, method=method
    )
    mask = batch["attention_mask"].double()
    e = model.embed.weight[batch["input_ids"]].detach()
    e_base = model.embed.weight[baseline.expand(3, -1)].detach()
    w = model.head.weight[target].detach()  # (N, D)
    closed = (e - e_base) * w[:, None, :] * (mask / mask.sum(dim=1, keepdim=True))[..., None]
    assert attribution.shape == (3, 5, 6)
    torch.testing.assert_close(attribution, closed, rtol=0, atol=1e-13)
    torch.testing.assert_close(scores, closed.sum(dim=2), rtol=0, atol=1e-13)
    assert torch.equal(scores[1, 3:], torch.zeros(2, dtype=torch.float64))


def test_zero_baseline_and_completeness() -> None:
    model = bag_model()
    batch = token_batch()
    ig = IntegratedGradients(model)
    attribution, delta = ig.attribute(batch, 1, baseline="zero", n_steps=3, return_convergence_delta=True)
    mask = batch["attention_mask"].double()
    e = model.embed.weight[batch["input_ids"]].detach()
    closed = e * model.head.weight[1].detach() * (mask / mask.sum(dim=1, keepdim=True))[..., None]
    torch.testing.assert_close(attribution, closed, rtol=0, atol=1e-13)
    torch.testing.assert_close(delta, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_padding_positions_are_exactly_zero_even_when_the_model_reads_them() -> None:
    model = bag_model(masked=False)  # the mean includes the pad tokens: their gradient is not zero
    batch = token_batch()
    for explainer in (Gradient(model), InputXGradient(model), IntegratedGradients(model)):
        scores = explainer.token_scores(batch, 0)
        assert torch.equal(scores[1, 3:], torch.zeros(2, dtype=torch.float64))
        assert bool((scores[1, :3] != 0).all())
        full = explainer.attribute(batch, 0)
        assert torch.equal(full[1, 3:], torch.zeros(2, 6, dtype=torch.float64))


def hand_gradient(model: EmbeddingBagClassifier, batch: dict[str, torch.Tensor], target: int) -> torch.Tensor:
    e = model.embed(batch["input_ids"]).detach().requires_grad_(True)
    logits = model.head(model.pool(e, batch["attention_mask"]))
    (grad,) = torch.autograd.grad(logits[:, target].sum(), e)
    return grad


def test_gradient_and_input_x_gradient_equal_hand_autograd() -> None:
    model = bag_model()
    batch = token_batch()
    grad = hand_gradient(model, batch, 2)
    e = model.embed(batch["input_ids"]).detach()
    torch.testing.assert_close(Gradient(model).attribute(batch, 2), grad, rtol=0, atol=0)
    torch.testing.assert_close(InputXGradient(model).attribute(batch, 2), e * grad, rtol=0, atol=0)
    torch.testing.assert_close(
        InputXGradient(model).token_scores(batch, 2), (e * grad).sum(2), rtol=0, atol=0
    )


def test_tensor_ids_and_a_layer_by_name_and_by_glob() -> None:
    model = bag_model()
    ids = token_batch()["input_ids"]
    by_default = Gradient(model).attribute(ids, 1)
    assert by_default.shape == (3, 5, 6)
    for layer in ("embed", "emb*", model.embed):
        torch.testing.assert_close(Gradient(model, layer=layer).attribute(ids, 1), by_default, rtol=0, atol=0)


def test_integer_inputs_without_embeddings_get_an_error_naming_the_fix() -> None:
    # This model has no get_input_embeddings: integer ids need layer=.
    bare = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(TypeError, match="layer="):
        Gradient(bare).attribute(torch.tensor([[1, 2, 3]]), 0)
    assert Gradient(bare, layer="0").attribute(torch.tensor([[1, 2, 3]]), 0).shape == (1, 3, 4)


def test_smoothgrad_adds_noise_at_the_embedding() -> None:
    model = bag_model()
    batch = token_batch()
    # The gradient of a linear model is the same everywhere: SmoothGrad of Gradient equals Gradient.
    smooth = SmoothGrad(Gradient(model), n_samples=4, noise_level=0.3).attribute(batch, 1)
    torch.testing.assert_close(smooth, Gradient(model).attribute(batch, 1), rtol=0, atol=1e-14)
    # Input x Gradient: the mean over noisy embeddings (drawn with the same seed) times the gradient.
    smoother = SmoothGrad(InputXGradient(model), n_samples=4, noise_level=0.3)
    e = model.embed(batch["input_ids"]).detach()
    expected = torch.stack(smoother.noisy_copies(e)).mean(0) * hand_gradient(model, batch, 1)
    mask = batch["attention_mask"][..., None] != 0
    torch.testing.assert_close(
        smoother.attribute(batch, 1), torch.where(mask, expected, 0.0), rtol=0, atol=1e-14
    )


def test_chunking_equals_one_pass() -> None:
    model = tiny_bert()
    batch = bert_batch()
    ig = IntegratedGradients(model)
    whole = ig.attribute(batch, 1, baseline="pad", n_steps=6, internal_batch_size=18)
    chunked = ig.attribute(batch, 1, baseline="pad", n_steps=6, internal_batch_size=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-15)


# -- Captum 0.9 -----------------------------------------------------------------------------------
def bert_forward(model: nn.Module):  # type: ignore[no-untyped-def]
    def forward(ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits

    return forward


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_layer_ig_equals_captum_on_bert_word_embeddings(method: str) -> None:
    model = tiny_bert()
    batch = bert_batch()
    n_steps = 16
    target = [0, 2, 1]
    ours = IntegratedGradients(model).attribute(batch, target, baseline="pad", n_steps=n_steps, method=method)
    lig = LayerIntegratedGradients(bert_forward(model), model.bert.embeddings.word_embeddings)
    theirs = lig.attribute(
        batch["input_ids"],
        baselines=torch.zeros_like(batch["input_ids"]),
        target=target,
        additional_forward_args=(batch["attention_mask"], batch["token_type_ids"]),
        n_steps=n_steps,
        method=method,
    )
    if method == "riemann_trapezoid":
        theirs = theirs * n_steps / (n_steps - 1)  # Captum's trapezoid weights sum to (n - 1)/n
    keep = batch["attention_mask"].bool()
    assert relative_error(ours[keep], theirs[keep]) < 1e-6
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-6, atol=1e-6 * float(theirs.abs().max()))
    assert torch.equal(ours[~keep], torch.zeros_like(ours[~keep]))


def test_layer_ig_equals_captum_on_gpt2_next_token_logit() -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    baseline = torch.full_like(ids, 3)
    lig = LayerIntegratedGradients(lambda i: model(i).logits[:, -1], model.transformer.wte)
    ig = IntegratedGradients(model)
    ours = ig.attribute(ids, 5, baseline=baseline, n_steps=12, method="gausslegendre")
    theirs = lig.attribute(ids, baselines=baseline, target=5, n_steps=12, method="gausslegendre")
    assert relative_error(ours, theirs) < 1e-6
    # target=None: the arg-max next token of each sample.
    argmax = model(ids).logits[:, -1].argmax(1)
    ours = ig.attribute(ids, None, baseline=baseline, n_steps=12, method="gausslegendre")
    theirs = lig.attribute(ids, baselines=baseline, target=argmax, n_steps=12, method="gausslegendre")
    assert relative_error(ours, theirs) < 1e-6


def test_input_x_gradient_and_gradient_equal_captum_layer_gradient_x_activation() -> None:
    model = tiny_bert()
    batch = bert_batch()
    args = (batch["attention_mask"], batch["token_type_ids"])
    layer = model.bert.embeddings.word_embeddings
    keep = batch["attention_mask"].bool()
    for multiply, ours in ((True, InputXGradient(model)), (False, Gradient(model))):
        theirs = LayerGradientXActivation(bert_forward(model), layer, multiply_by_inputs=multiply).attribute(
            batch["input_ids"], target=2, additional_forward_args=args
        )
        mine = ours.attribute(batch, 2)
        assert relative_error(mine[keep], theirs[keep].detach()) < 1e-12
        assert torch.equal(mine[~keep], torch.zeros_like(mine[~keep]))


def test_ig_at_a_conv_layer_equals_captum() -> None:
    torch.manual_seed(1)
    model = (
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    )
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    ours = IntegratedGradients(model, layer="0").attribute(x, 1, n_steps=10, method="gausslegendre")
    theirs = LayerIntegratedGradients(model, model[0]).attribute(
        x, target=1, n_steps=10, method="gausslegendre"
    )
    assert ours.shape == (2, 4, 4, 4)
    assert relative_error(ours, theirs) < 1e-7


# -- causal LMs ---------------------------------------------------------------------------------------
def test_next_token_target_reads_the_last_attended_position() -> None:
    model = tiny_gpt2()
    ids = torch.tensor([[5, 9, 2, 7, 1, 1]])
    ig = IntegratedGradients(model)
    alone = ig.token_scores(ids[:, :4], 3, baseline="zero", n_steps=6)
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]])}
    with_padding = ig.token_scores(padded, 3, baseline="zero", n_steps=6)
    torch.testing.assert_close(with_padding[:, :4], alone, rtol=1e-10, atol=1e-14)
    assert torch.equal(with_padding[:, 4:], torch.zeros(1, 2, dtype=torch.float64))


def test_explain_continuation_equals_one_call_per_token() -> None:
    model = tiny_gpt2()
    prompt = torch.tensor([[4, 8, 15]])
    continuation = torch.tensor([16, 23, 2])
    ig = IntegratedGradients(model)
    scores = ig.explain_continuation(prompt, continuation, baseline="zero", n_steps=5)
    assert scores.shape == (3, 5)
    for k in range(3):
        fed = torch.cat([prompt, continuation[None, :k]], dim=1)
        single = ig.token_scores(fed, int(continuation[k]), baseline="zero", n_steps=5)
        torch.testing.assert_close(scores[k, : 3 + k], single[0], rtol=1e-9, atol=1e-13)
        assert float(scores[k, 3 + k :].abs().sum()) < 1e-12  # causal: later tokens do not count
    with_mask = ig.explain_continuation(
        {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
        continuation,
        baseline="zero",
        n_steps=5,
    )
    torch.testing.assert_close(with_mask, scores, rtol=1e-9, atol=1e-13)


# -- baselines ----------------------------------------------------------------------------------------
def test_mask_and_pad_baselines() -> None:
    model = tiny_bert()
    batch = bert_batch()
    ig = IntegratedGradients(model)
    with pytest.raises(ValueError, match="mask_token_id"):
        ig.attribute(batch, 0, baseline="mask", n_steps=4)
    by_mask = ig.attribute(batch, 0, baseline="mask", mask_token_id=7, n_steps=4)
    by_ids = ig.attribute(batch, 0, baseline=torch.full((1, 8), 7), n_steps=4)
    torch.testing.assert_close(by_mask, by_ids, rtol=0, atol=0)
    by_pad = ig.attribute(batch, 0, baseline="pad", n_steps=4)
    torch.testing.assert_close(by_pad, ig.attribute(batch, 0, baseline="pad", pad_token_id=0, n_steps=4))
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match="pad_token_id"):
        IntegratedGradients(gpt2).attribute(torch.tensor([[1, 2]]), 0, baseline="pad", n_steps=2)


# -- the model is never mutated ---------------------------------------------------------------------
def snapshot(model: nn.Module) -> tuple[list[bool], list[bool], dict[str, torch.Tensor]]:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(
    model: nn.Module, before: tuple[list[bool], list[bool], dict[str, torch.Tensor]]
) -> None:
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert after[2].keys() == before[2].keys()
    assert all(torch.equal(after[2][k], before[2][k]) for k in before[2])
    assert count_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_model_is_not_mutated_also_on_error() -> None:
    model = tiny_bert()
    model.train()
    model.classifier.weight.requires_grad_(False)
    before = snapshot(model)
    batch = bert_batch()
    IntegratedGradients(model).attribute(batch, 1, baseline="pad", n_steps=3)
    SmoothGrad(InputXGradient(model), n_samples=2).token_scores(batch, 1)
    Gradient(model).token_scores(batch, None)
    assert_unchanged(model, before)
    with pytest.raises(TargetError):
        IntegratedGradients(model).attribute(batch, 9, baseline="pad", n_steps=3)
    with pytest.raises(TargetError):
        Gradient(model).attribute(batch, 9)
    assert_unchanged(model, before)


def test_a_layer_that_runs_twice_is_refused_and_its_hook_removed() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids).mean(1) + self.embed(ids[:, :1]).mean(1))

    model = Twice()
    with pytest.raises(LayerCallError, match="ran 2 times"):
        Gradient(model, layer="embed").attribute(torch.tensor([[1, 2, 3]]), 0)
    assert count_hooks(model) == 0


def test_mapping_inputs_and_unknown_options() -> None:
    model = bag_model()

    class Encoding(collections.UserDict):  # type: ignore[type-arg]
        """Like transformers' BatchEncoding: a Mapping that is not a dict."""

    batch = token_batch()
    encoded = Encoding(batch)
    torch.testing.assert_close(Gradient(model).attribute(encoded, 1), Gradient(model).attribute(batch, 1))
    with pytest.raises(TypeError, match="n_stepz"):
        Gradient(model).attribute(batch, 1, n_stepz=3)
    with pytest.raises(ValueError, match="matches 2 modules"):
        Gradient(model, layer="*e*")


# -- GradientSHAP -------------------------------------------------------------------------------------
def test_gradient_shap_is_exact_on_the_linear_model_with_one_reference() -> None:
    model = bag_model()
    batch = token_batch()
    reference = torch.tensor([[2, 2, 2, 2, 2]])
    ours = GradientSHAP(model).attribute(batch, 1, baselines=reference, n_samples=5)
    closed = IntegratedGradients(model).attribute(batch, 1, baseline=reference, n_steps=2)
    torch.testing.assert_close(ours, closed, rtol=0, atol=1e-13)


@pytest.mark.parametrize("stdevs", [0.0, 0.05])
def test_gradient_shap_at_the_embeddings_equals_a_hand_loop_over_inputs_embeds(stdevs: float) -> None:
    model = tiny_bert()
    batch = bert_batch()
    references = torch.tensor([[0] * 8, [5] * 8])
    n, n_samples, target = 3, 4, 2
    ours = GradientSHAP(model, seed=7).attribute(
        batch,
        target,
        baselines=references,
        n_samples=n_samples,
        stdevs=stdevs,
        internal_batch_size=n * n_samples,
    )
    # The same draws, in the same order, through inputs_embeds (no hooks): draw j (reference, path
    # point, noise of one sample's shape) is shared by the samples; rows are draw-major.
    generator = torch.Generator().manual_seed(7)
    choice = torch.randint(2, (n_samples,), generator=generator)
    alphas = torch.rand(n_samples, generator=generator, dtype=torch.float64)
    embed = model.bert.embeddings.word_embeddings
    sample = torch.arange(n * n_samples) % n
    draw = torch.arange(n * n_samples) // n
    x = embed(batch["input_ids"]).detach()[sample]
    if stdevs > 0:
        shape = (1, *x.shape[1:])
        noise = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(n_samples)]
        x = x + stdevs * torch.cat(noise)[draw]
    base = embed(references).detach()[choice[draw]]
    point = (base + alphas[draw].view(-1, 1, 1) * (x - base)).requires_grad_(True)
    logits = model(
        inputs_embeds=point,
        attention_mask=batch["attention_mask"][sample],
        token_type_ids=batch["token_type_ids"][sample],
    ).logits
    (grad,) = torch.autograd.grad(logits[:, target].sum(), point)
    expected = torch.zeros(n, 8, 16, dtype=torch.float64).index_add_(0, sample, (x - base) * grad) / n_samples
    keep = batch["attention_mask"].bool()
    assert relative_error(ours[keep], expected[keep]) < 1e-10
    assert torch.equal(ours[~keep], torch.zeros_like(ours[~keep]))


@pytest.mark.slow  # importing torch._dynamo alone takes 10-25 s on a loaded machine
def test_a_compiled_model_is_explained_through_its_eager_modules() -> None:
    model = bag_model()
    compiled = torch.compile(model)
    batch = token_batch()
    for layer in (None, "embed"):
        ours = IntegratedGradients(compiled, layer=layer).attribute(batch, 1, baseline="zero", n_steps=4)
        torch.testing.assert_close(
            ours, IntegratedGradients(model).attribute(batch, 1, baseline="zero", n_steps=4)
        )
    assert count_hooks(model) == 0


def test_smoothgrad_without_noise_equals_its_inner_method_also_for_ig_and_continuations() -> None:
    model = tiny_bert()
    batch = bert_batch()
    ig = IntegratedGradients(model)
    smooth = SmoothGrad(ig, n_samples=2, noise_level=0.0).attribute(batch, 1, baseline="pad", n_steps=4)
    torch.testing.assert_close(
        smooth, ig.attribute(batch, 1, baseline="pad", n_steps=4), rtol=1e-12, atol=1e-15
    )
    gpt2 = tiny_gpt2()
    prompt, continuation = torch.tensor([[4, 8]]), torch.tensor([16, 23])
    smooth_table = SmoothGrad(Gradient(gpt2), n_samples=2, noise_level=0.0).explain_continuation(
        prompt, continuation
    )
    table = Gradient(gpt2).explain_continuation(prompt, continuation)
    torch.testing.assert_close(smooth_table, table, rtol=1e-12, atol=1e-15)


def test_saliency_of_token_inputs_is_the_absolute_token_score() -> None:
    model = bag_model()
    batch = token_batch()
    explainer = InputXGradient(model)
    saliency = explainer.saliency(batch, 0)
    assert saliency.shape == (3, 5)
    torch.testing.assert_close(saliency, explainer.token_scores(batch, 0).abs(), rtol=0, atol=0)
