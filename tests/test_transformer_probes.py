"""TransformerProbes: stored statistics against a hand computation (numpy, float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bbdecoder import Analyzer
from bbdecoder.attribution.attention_capture import AttentionCaptureError
from bbdecoder.hooks import count_hooks
from bbdecoder.monitor.transformer_probes import TransformerProbes, activation_stats, attention_entropy
from bbdecoder.store import open_run
from tests.test_rollout import ToyViT

transformers = pytest.importorskip("transformers")


def _kurtosis(a: np.ndarray) -> float:
    c = a - a.mean(axis=-1, keepdims=True)
    return float(((c**4).mean(axis=-1) / (c**2).mean(axis=-1) ** 2).mean())


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=-1).mean(axis=(0, 2))


def test_helpers_against_numpy() -> None:
    a = torch.randn(3, 5, 8) * torch.linspace(0.1, 4, 8)
    rms, max_abs, kurt = activation_stats(a)
    x = a.double().numpy()
    assert float(rms) == pytest.approx(np.sqrt((x**2).mean()), rel=1e-5)
    assert float(max_abs) == pytest.approx(np.abs(x).max(), rel=1e-6)
    assert float(kurt) == pytest.approx(_kurtosis(x), rel=1e-4)
    p = torch.softmax(torch.randn(2, 3, 4, 4), dim=-1)
    p[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # 0 log 0 = 0
    np.testing.assert_allclose(attention_entropy(p).double().numpy(), _entropy(p.double().numpy()), rtol=1e-5)


def _bert(attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config)


def test_bert_probes_match_hand_computation(tmp_path: Path) -> None:
    model = _bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # transformers adds its output-recording hooks on the first such call
        model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    hooks_before = count_hooks(model)
    labels = torch.tensor([0, 1, 2, 0])
    analyzer = Analyzer(model, tmp_path)
    probes = TransformerProbes(analyzer)
    expected: list[dict[tuple[str, str], float]] = []
    for _ in range(2):
        model.train()
        out = model(input_ids=ids, labels=labels, output_attentions=True, output_hidden_states=True)
        ref: dict[tuple[str, str], float] = {}
        for i, hidden in enumerate(out.hidden_states[1:]):
            h = hidden.detach().double().numpy()
            name = f"bert.encoder.layer.{i}"
            ref[(name, "act_rms")] = float(np.sqrt((h**2).mean()))
            ref[(name, "act_max_abs")] = float(np.abs(h).max())
            ref[(name, "act_kurtosis")] = _kurtosis(h)
        for i, att in enumerate(out.attentions):
            for head, value in enumerate(_entropy(att.detach().double().numpy())):
                ref[(f"bert.encoder.layer.{i}.attention.self.head{head}", "attn_entropy")] = float(value)
        logits = out.logits.detach().double().numpy()
        ref[("logits", "logit_mean")] = float(logits.mean())
        ref[("logits", "logit_max")] = float(logits.max())
        expected.append(ref)
        optimizer.zero_grad()
        out.loss.backward()
        analyzer.step(loss=out.loss)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # eval forwards are not recorded
    probes.close()
    analyzer.close()
    assert count_hooks(model) == hooks_before
    run = open_run(tmp_path)
    for stat in ("act_rms", "act_max_abs", "act_kurtosis", "attn_entropy", "logit_mean", "logit_max"):
        rows = run.scalars(stat)
        assert len(rows) > 0, stat
        for row in rows.itertuples():
            assert row.layer_id == -1
            assert row.value == pytest.approx(expected[row.step][(row.param, stat)], rel=1e-4), (
                row.step,
                row.param,
            )
        steps = sorted(set(rows.step))
        assert steps == [0, 1], stat
    heads = {p for p in run.scalars("attn_entropy").param}
    assert heads == {f"bert.encoder.layer.{i}.attention.self.head{h}" for i in range(2) for h in range(2)}


def test_sdpa_model_refuses_attention_entropy(tmp_path: Path) -> None:
    model = _bert("sdpa")
    analyzer = Analyzer(model, tmp_path)
    with pytest.raises(AttentionCaptureError, match="eager"):
        TransformerProbes(analyzer)
    probes = TransformerProbes(analyzer, attention=False)
    probes.close()
    analyzer.close()


def test_timm_style_blocks_and_accumulation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ToyViT(fused=False)
    analyzer = Analyzer(model, tmp_path)
    x = torch.randn(2, 3, 16, 16)
    values = []
    with TransformerProbes(analyzer) as _probes:
        model.train()
        for half in (x[:1], x[1:]):  # two micro-batches, one step
            out = model(half)
            values.append(
                (
                    _entropy(model.blocks[0].attn.last_attn.detach().double().numpy()),
                    float(out.detach().max()),
                )
            )
            out.sum().backward()
        analyzer.step()
        model(x)  # the next step's forward flushes the first
    analyzer.close()
    run = open_run(tmp_path)
    entropy = run.scalars("attn_entropy")
    first = entropy[(entropy.step == 0) & (entropy.param == "blocks.0.attn.head1")].value
    assert float(first.iloc[0]) == pytest.approx((values[0][0][1] + values[1][0][1]) / 2, rel=1e-4)
    logit_max = run.scalars("logit_max")
    assert float(logit_max[logit_max.step == 0].value.iloc[0]) == pytest.approx(
        max(v[1] for v in values), rel=1e-6
    )
    assert set(run.scalars("act_rms").param) == {"blocks.0", "blocks.1"}
    assert set(run.scalars("act_rms").step) == {0, 1}


def test_probes_record_the_steps_the_analyzer_records(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ToyViT(fused=False).train()
    analyzer = Analyzer(model, tmp_path, every=2)
    with TransformerProbes(analyzer):
        for _ in range(5):
            model(torch.randn(2, 3, 16, 16)).sum().backward()
            analyzer.step()
    analyzer.close()
    run = open_run(tmp_path)
    assert set(run.scalars("l2").step) == {0, 2, 4}
    for stat in ("act_rms", "attn_entropy", "logit_max"):
        assert set(run.scalars(stat).step) == {0, 2, 4}, stat


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("transform", ["vmap_grad", "grad"])
def test_forwards_inside_torch_func_transforms_are_left_out(tmp_path: Path, transform: str) -> None:
    """Per-sample gradients with ``torch.func`` run the model on wrapper tensors that must not
    escape the transform: the probes leave those forwards out (they used to keep the wrappers,
    and the next step's flush raised inside the user's forward), and record the training step's
    forwards as without them."""
    from torch.func import functional_call, grad, vmap

    def train(path: Path, per_sample: bool) -> dict[str, list[float]]:
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        model = torch.nn.Sequential(encoder, torch.nn.Flatten(), torch.nn.Linear(5 * 16, 3)).train()
        analyzer = Analyzer(model, path)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (x.unsqueeze(0) if transform == "vmap_grad" else x,)).sum()

        with TransformerProbes(analyzer):
            for step in range(3):
                x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(step))
                if per_sample:
                    if transform == "vmap_grad":
                        vmap(grad(loss_of), in_dims=(None, 0))(params, x)
                    else:
                        grad(loss_of)(params, x)
                model(x).sum().backward()
                analyzer.step()
        analyzer.close()
        run = open_run(path)
        return {stat: run.scalars(stat).value.tolist() for stat in ("act_rms", "attn_entropy", "logit_max")}

    recorded = train(tmp_path / "with", True)
    assert recorded == train(tmp_path / "without", False)
    assert all(len(values) >= 3 for values in recorded.values()), recorded
