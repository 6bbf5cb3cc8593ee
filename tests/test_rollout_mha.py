"""Rollout on torch's nn.MultiheadAttention (nn.TransformerEncoder): hand-computed oracles; the calls
(their need_weights / average_attn_weights) and torch's fast-path setting left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder import AttentionRollout, GradientRollout
from bbdecoder.attribution.attention_capture import (
    AttentionCaptureError,
    capture_attention,
    mha_attention_weights,
    mha_call,
)
from bbdecoder.hooks import HookManager, count_hooks


class MHAViT(nn.Module):
    """Patch conv, class token, a 2-layer 2-head nn.TransformerEncoder (post-norm), linear head."""

    def __init__(self, batch_first: bool = True, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(dim, heads, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), t], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        h = self.encoder(t if self.batch_first else t.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1))[:, 0])


def hand_forward(model: MHAViT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's forward written out (batch-first), A = softmax(q k^T / sqrt(d)) kept in the graph."""
    h = model.tokens(x)
    attentions = []
    for layer in model.encoder.layers:
        attn = layer.self_attn
        n, t, e = h.shape
        heads, d = attn.num_heads, e // attn.num_heads
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, heads, d).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        attentions.append(a)
        out = attn.out_proj((a @ v).transpose(1, 2).reshape(n, t, e))
        h = layer.norm1(h + out)
        h = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    return model.head(h[:, 0]), attentions


def numpy_rollout(attentions: list[np.ndarray]) -> np.ndarray:
    n, _, t, _ = attentions[0].shape
    result = np.broadcast_to(np.eye(t), (n, t, t))
    for a in attentions:
        m = 0.5 * a.mean(axis=1) + 0.5 * np.eye(t)
        m = m / m.sum(axis=-1, keepdims=True)
        result = m @ result
    return result


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_rollout_equals_the_hand_product(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = MHAViT(batch_first).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, attentions = hand_forward(model, x)
        torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)  # the hand forward is the model
    expected = numpy_rollout([a.double().numpy() for a in attentions])[:, 0, 1:].reshape(2, 1, 4, 4)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    got = AttentionRollout(model).attribute(x)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert count_hooks(model) == 0
    assert AttentionRollout(model).saliency(x).shape == (2, 1, 16, 16)


def test_gradient_rollout_equals_autograd_on_the_hand_forward() -> None:
    torch.manual_seed(1)
    model = MHAViT().eval()
    x = torch.randn(2, 3, 16, 16)
    target = torch.tensor([2, 0])
    logits, attentions = hand_forward(model, x)
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), attentions)
    t = attentions[0].shape[-1]
    result = np.broadcast_to(np.eye(t), (2, t, t))
    for a, g in zip(attentions, grads, strict=True):
        a_bar = np.maximum(g.double().numpy() * a.detach().double().numpy(), 0).mean(axis=1)
        result = result + a_bar @ result
    expected = result[:, 0, 1:].reshape(2, 1, 4, 4)
    got = GradientRollout(model).attribute(x, target)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-7)
    assert count_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


class UsesWeights(nn.Module):
    """Calls nn.MultiheadAttention itself: once asking for the head-averaged weights (and using them),
    once with need_weights=False (and checking it got None)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.other = nn.MultiheadAttention(6, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attn(x, x, x)  # need_weights=True, averaged: (N, L, S)
        assert weights.dim() == 3
        second, none = self.other(out, out, out, None, False)  # positional need_weights=False
        assert none is None
        return second.sum(dim=(1, 2)) + weights.sum(dim=(1, 2)) * 0.1


def test_each_call_gets_back_what_it_asked_for_and_per_head_weights_are_captured() -> None:
    torch.manual_seed(2)
    model = UsesWeights().eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        plain = model(x)
        with HookManager() as hooks, capture_attention(model, hooks) as captured:
            captured_out = model(x)
        assert count_hooks(model) == 0
    torch.testing.assert_close(captured_out, plain, rtol=1e-5, atol=1e-6)
    assert [tuple(w.shape) for w in captured.weights] == [(2, 2, 5, 5), (2, 3, 5, 5)]
    # the per-head weights average to what the module returns by default
    _, averaged = model.attn(x, x, x)
    torch.testing.assert_close(captured.weights[0].mean(dim=1), averaged.detach(), rtol=1e-5, atol=1e-6)


def test_recomputed_weights_equal_the_module_s_own_with_masks() -> None:
    torch.manual_seed(3)
    for batch_first in (True, False):
        attn = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        q = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
        padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        for call in (
            {"query": q, "key": q, "value": q},
            {"query": q, "key": q, "value": q, "key_padding_mask": padding},
            {"query": q, "key": q, "value": q, "key_padding_mask": padding, "attn_mask": causal},
        ):
            with torch.no_grad():
                _, own = attn(**call, need_weights=True, average_attn_weights=False)
            torch.testing.assert_close(
                mha_attention_weights(attn, mha_call((), call)), own, rtol=1e-5, atol=1e-6
            )


def test_add_bias_kv_is_a_clear_error() -> None:
    model = UsesWeights().eval()
    model.attn = nn.MultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
    with (
        pytest.raises(AttentionCaptureError, match="add_bias_kv"),
        HookManager() as hooks,
        capture_attention(model, hooks),
    ):
        pass
    assert count_hooks(model) == 0
