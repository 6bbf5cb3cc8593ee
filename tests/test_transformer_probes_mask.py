"""TransformerProbes leave padding out: activation statistics over the non-pad tokens, attention
entropy over the non-pad query rows and keys; checked against a hand computation (numpy, float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bbdecoder import Analyzer
from bbdecoder.demo.text import TextTransformer, make_text_data
from bbdecoder.hooks import count_hooks
from bbdecoder.monitor.transformer_probes import TransformerProbes, activation_stats, attention_entropy
from bbdecoder.store import open_run


def np_stats(h: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    tokens = h[keep]  # (M, D)
    c = tokens - tokens.mean(axis=-1, keepdims=True)
    return {
        "act_rms": float(np.sqrt((tokens**2).mean())),
        "act_max_abs": float(np.abs(tokens).max()),
        "act_kurtosis": float(((c**4).mean(-1) / (c**2).mean(-1) ** 2).mean()),
    }


def np_entropy(p: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per head: rows of real queries, each restricted to real keys and renormalised."""
    n, heads, lq, _ = p.shape
    out = np.zeros(heads)
    for h in range(heads):
        values = []
        for i in range(n):
            for q in range(lq):
                if not keep[i, q]:
                    continue
                row = p[i, h, q][keep[i]]
                row = row / row.sum()
                values.append(-sum(v * np.log(v) for v in row if v > 0))
        out[h] = np.mean(values)
    return out


def test_helpers_with_masks_against_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 8, generator=generator) * torch.linspace(0.5, 3, 8)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    a[~keep] = 100.0  # padding rows that would dominate every statistic
    rms, max_abs, kurtosis = activation_stats(a, keep)
    expected = np_stats(a.double().numpy(), keep.numpy())
    assert float(rms) == pytest.approx(expected["act_rms"], rel=1e-5)
    assert float(max_abs) == pytest.approx(expected["act_max_abs"], rel=1e-6)
    assert float(kurtosis) == pytest.approx(expected["act_kurtosis"], rel=1e-4)
    # weights that also put mass on the padding keys (a model that does not mask them)
    p = torch.softmax(torch.randn(3, 2, 5, 5, generator=generator), dim=-1)
    np.testing.assert_allclose(
        attention_entropy(p, keep, keep).double().numpy(),
        np_entropy(p.double().numpy(), keep.numpy()),
        rtol=1e-5,
    )


def test_text_transformer_probes_leave_the_padding_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TextTransformer()
    data = make_text_data(6, seed=5)
    ids, mask = data.input_ids, data.attention_mask
    assert bool((mask == 0).any())
    keep = (mask != 0).numpy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    analyzer = Analyzer(model, tmp_path)
    probes = TransformerProbes(analyzer)
    expected = []
    for step in range(2):
        model.train()
        # by hand: the blocks' outputs and each layer's per-head weights from the module itself
        with torch.no_grad():
            h = model.embed(ids) + model.position(torch.arange(ids.shape[1]))
            pad = mask == 0
            ref: dict[tuple[str, str], float] = {}
            for i, layer in enumerate(model.encoder.layers):
                _, weights = layer.self_attn(
                    h, h, h, key_padding_mask=pad, need_weights=True, average_attn_weights=False
                )
                for head, value in enumerate(np_entropy(weights.double().numpy(), keep)):
                    ref[(f"encoder.layers.{i}.self_attn.head{head}", "attn_entropy")] = float(value)
                h = layer(h, src_key_padding_mask=pad)
                for stat, value in np_stats(h.double().numpy(), keep).items():
                    ref[(f"encoder.layers.{i}", stat)] = value
                unmasked = np_stats(h.double().numpy(), np.ones_like(keep))
                # post-norm blocks have RMS 1 per token; kurtosis shows whether padding was counted
                assert abs(unmasked["act_kurtosis"] - ref[(f"encoder.layers.{i}", "act_kurtosis")]) > 1e-3
        expected.append(ref)
        # step 0 passes the mask by keyword, step 1 positionally
        logits = model(input_ids=ids, attention_mask=mask) if step == 0 else model(ids, mask)
        loss = F.cross_entropy(logits, data.labels)
        optimizer.zero_grad()
        analyzer.backward_propagation(loss)
        optimizer.step()
    model.eval()
    probes.close()
    analyzer.close()
    assert count_hooks(model) == 0
    run = open_run(tmp_path)
    checked = 0
    for stat in ("act_rms", "act_max_abs", "act_kurtosis", "attn_entropy"):
        rows = run.scalars(stat)
        assert sorted(set(rows.step)) == [0, 1], stat
        for row in rows.itertuples():
            assert row.value == pytest.approx(expected[row.step][(row.param, stat)], rel=1e-4), (
                row.step,
                row.param,
            )
            checked += 1
    assert checked == 2 * (3 * 2 + 2 * 2)


def test_bert_probes_read_the_attention_mask(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.test_transformer_probes import _bert

    del transformers
    model = _bert()
    ids = torch.randint(1, 30, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    keep = (mask != 0).numpy()
    analyzer = Analyzer(model, tmp_path)
    probes = TransformerProbes(analyzer)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    out.logits.sum().backward()
    analyzer.step()
    probes.close()
    analyzer.close()
    run = open_run(tmp_path)
    for i, hidden in enumerate(out.hidden_states[1:]):
        for stat, value in np_stats(hidden.detach().double().numpy(), keep).items():
            stored = run.scalars(stat)
            got = stored[stored.param == f"bert.encoder.layer.{i}"].value.iloc[0]
            assert got == pytest.approx(value, rel=1e-4), (i, stat)
    entropy = run.scalars("attn_entropy")
    for i, attention in enumerate(out.attentions):
        for head, value in enumerate(np_entropy(attention.detach().double().numpy(), keep)):
            got = entropy[entropy.param == f"bert.encoder.layer.{i}.attention.self.head{head}"].value.iloc[0]
            assert got == pytest.approx(value, rel=1e-4), (i, head)
