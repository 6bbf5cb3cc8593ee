"""Attention rollout and gradient rollout: hand-computed oracles, a timm-style toy ViT, HF ViT and DeiT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder import AttentionRollout, GradientRollout
from bbdecoder.attribution.attention_capture import AttentionCaptureError
from bbdecoder.attribution.rollout import rollout, token_layout
from bbdecoder.hooks import count_hooks


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_rollout_equals_hand_computed_product_two_layers_two_heads() -> None:
    rng = np.random.default_rng(0)
    a1 = _softmax_rows(rng.normal(size=(1, 2, 3, 3)))
    a2 = _softmax_rows(rng.normal(size=(1, 2, 3, 3)))
    # by hand: mean over the two heads, 0.5 A + 0.5 I, rows renormalised, layer 2 times layer 1
    expected = np.zeros((3, 3))
    m1 = np.zeros((3, 3))
    m2 = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            m1[i, j] = 0.5 * (a1[0, 0, i, j] + a1[0, 1, i, j]) / 2 + 0.5 * (i == j)
            m2[i, j] = 0.5 * (a2[0, 0, i, j] + a2[0, 1, i, j]) / 2 + 0.5 * (i == j)
    m1 /= m1.sum(axis=1, keepdims=True)
    m2 /= m2.sum(axis=1, keepdims=True)
    for i in range(3):
        for j in range(3):
            expected[i, j] = sum(m2[i, k] * m1[k, j] for k in range(3))
    got = rollout([torch.tensor(a1), torch.tensor(a2)]).double().numpy()[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # max fusion and a discard ratio: 1 of the 2 non-class entries of every row of the fused map is dropped
    fused = a1.max(axis=1)[0]
    dropped = fused.copy()
    for i in range(3):
        low = 1 + int(np.argmin(fused[i, 1:]))
        dropped[i, low] = 0.0
    m = 0.5 * dropped + 0.5 * np.eye(3)
    m /= m.sum(axis=1, keepdims=True)
    got = rollout([torch.tensor(a1)], head_fusion="max", discard_ratio=0.5).double().numpy()[0]
    np.testing.assert_allclose(got, m, rtol=1e-6)


class ToyAttention(nn.Module):
    """timm's Attention layout: qkv Linear, num_heads, scale, proj; fused SDPA or explicit softmax."""

    def __init__(self, dim: int, heads: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused = fused
        self.last_attn: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            if attn.requires_grad:
                attn.retain_grad()
            self.last_attn = attn
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ToyAttention(dim, heads, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    """cls token as a parameter on the container, conv patch embedding, 2 blocks of 2 heads."""

    def __init__(
        self, fused: bool = True, dim: int = 16, patch: int = 4, image: int = 16, classes: int = 3
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.5)
        self.blocks = nn.Sequential(ToyBlock(dim, 2, fused), ToyBlock(dim, 2, fused))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _toy(fused: bool) -> ToyViT:
    torch.manual_seed(0)
    return ToyViT(fused=fused)


def test_timm_style_rollout_matches_weights_recomputed_by_hand() -> None:
    model = _toy(fused=True)
    x = torch.randn(2, 3, 16, 16)
    reference = _toy(fused=False)
    with torch.no_grad():
        reference(x)
    maps = []
    with torch.no_grad():
        h = reference.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([reference.cls_token.expand(2, -1, -1), h], 1) + reference.pos
        for block in reference.blocks:
            block(h)
            maps.append(block.attn.last_attn.double().numpy())
            h = block(h)
    expected = np.stack([np.eye(17)] * 2)
    for a in maps:
        m = 0.5 * a.mean(axis=1) + 0.5 * np.eye(17)
        m /= m.sum(axis=-1, keepdims=True)
        expected = m @ expected
    got = AttentionRollout(model).attribute(x)
    assert got.shape == (2, 1, 4, 4)
    np.testing.assert_allclose(got.double().numpy().reshape(2, 16), expected[:, 0, 1:], rtol=1e-4, atol=1e-7)
    sal = AttentionRollout(model).saliency(x)
    assert sal.shape == (2, 1, 16, 16)
    torch.testing.assert_close(sal, F.interpolate(got, size=(16, 16), mode="bilinear", align_corners=False))


def test_timm_style_gradient_rollout_matches_autograd_on_the_explicit_attention() -> None:
    fused, explicit = _toy(fused=True), _toy(fused=False)
    x = torch.randn(2, 3, 16, 16)
    target = torch.tensor([0, 2])
    explicit.eval()
    out = explicit(x)
    out.gather(1, target[:, None]).sum().backward()
    r = torch.eye(17, dtype=torch.float64).expand(2, 17, 17)
    for block in explicit.blocks:
        a = block.attn.last_attn
        a_bar = torch.relu(a.grad.double() * a.detach().double()).mean(dim=1)
        r = r + a_bar @ r
    got = GradientRollout(fused).attribute(x, target)
    torch.testing.assert_close(got.double().reshape(2, 16), r[:, 0, 1:], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in fused.parameters())  # parameter gradients untouched


def test_no_attention_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(AttentionCaptureError, match="qkv"):
        AttentionRollout(model).attribute(torch.randn(1, 3, 8, 8))
    assert count_hooks(model) == 0


def test_token_layout() -> None:
    model = nn.Linear(2, 2)
    assert token_layout(model, 17, (32, 32)) == (1, 4, 4)
    assert token_layout(model, 18, (32, 32), prefix_tokens=2) == (2, 4, 4)
    assert token_layout(model, 9, (16, 32)) == (1, 2, 4)
    with pytest.raises(ValueError, match="prefix_tokens"):
        token_layout(model, 18, (32, 32))


# -- Hugging Face ---------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf(kind: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    if kind == "vit":
        model = transformers.ViTForImageClassification(
            transformers.ViTConfig(attn_implementation=attn, **kwargs)
        )
    elif kind == "registers":
        model = transformers.Dinov2WithRegistersForImageClassification(
            transformers.Dinov2WithRegistersConfig(attn_implementation=attn, num_register_tokens=4, **kwargs)
        )
    else:
        model = transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(attn_implementation=attn, **kwargs)
        )
    assert model.config._attn_implementation == attn
    return model


@pytest.mark.parametrize("kind,prefix", [("vit", 1), ("deit", 2), ("registers", 5)])
def test_hf_rollout_sdpa_equals_eager_and_hand_rollout(kind: str, prefix: int) -> None:
    x = torch.randn(2, 3, 32, 32)
    eager, sdpa = _hf(kind, "eager"), _hf(kind, "sdpa")
    sdpa.train()
    with torch.no_grad():
        eager.eval()
        attentions = eager(x, output_attentions=True).attentions
    expected = np.stack([np.eye(16 + prefix)] * 2)
    for a in attentions:
        m = 0.5 * a.double().numpy().mean(axis=1) + 0.5 * np.eye(16 + prefix)
        m /= m.sum(axis=-1, keepdims=True)
        expected = m @ expected
    for model in (eager, sdpa):
        before = model.config._attn_implementation
        modes = [m.training for m in model.modules()]
        hooks = count_hooks(model)  # transformers registers its own output-recording hooks
        got = AttentionRollout(model).attribute(x)
        assert got.shape == (2, 1, 4, 4)
        np.testing.assert_allclose(
            got.double().numpy().reshape(2, 16), expected[:, 0, prefix:], rtol=1e-4, atol=1e-7
        )
        assert model.config._attn_implementation == before
        assert [m.training for m in model.modules()] == modes
        assert count_hooks(model) == hooks
    assert sdpa.config._attn_implementation == "sdpa"
    hooks = count_hooks(sdpa)
    g_eager = GradientRollout(eager).attribute(x, target=1)
    g_sdpa = GradientRollout(sdpa).attribute(x, target=1)
    assert g_eager.shape == (2, 1, 4, 4) and g_eager.abs().sum() > 0
    torch.testing.assert_close(g_sdpa, g_eager, rtol=1e-4, atol=1e-6)
    assert GradientRollout(sdpa).saliency(x).shape == (2, 1, 32, 32)
    assert sdpa.config._attn_implementation == "sdpa" and count_hooks(sdpa) == hooks


def test_hf_gradient_rollout_matches_autograd_on_output_attentions() -> None:
    model = _hf("vit", "eager").eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, output_attentions=True)
    atts = out.attentions
    grads = torch.autograd.grad(out.logits[:, 2].sum(), atts)
    r = torch.eye(17, dtype=torch.float64).expand(2, 17, 17)
    for a, g in zip(atts, grads, strict=True):
        r = r + torch.relu(g.double() * a.detach().double()).mean(dim=1) @ r
    got = GradientRollout(model).attribute(x, target=2)
    torch.testing.assert_close(got.double().reshape(2, 16), r[:, 0, 1:], rtol=1e-4, atol=1e-7)


def test_hf_state_restored_when_the_call_fails() -> None:
    model = _hf("vit", "sdpa").train()
    x = torch.randn(1, 3, 32, 32)
    hooks = count_hooks(model)

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    handle = model.classifier.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        GradientRollout(model).attribute(x)
    handle.remove()
    assert model.config._attn_implementation == "sdpa" and count_hooks(model) == hooks
    with pytest.raises(ValueError, match="out of range"):
        GradientRollout(model).attribute(x, target=7)
    assert model.config._attn_implementation == "sdpa" and count_hooks(model) == hooks
    assert all(m.training for m in model.modules())


def test_hf_vit_model_without_head_and_callable_target() -> None:
    model = _hf("vit", "sdpa")
    x = torch.randn(2, 3, 32, 32)
    backbone = model.vit  # a ViTModel: returns BaseModelOutput, no logits
    torch.testing.assert_close(AttentionRollout(backbone).attribute(x), AttentionRollout(model).attribute(x))
    grid = GradientRollout(backbone).attribute(x, target=lambda out: out.last_hidden_state[:, 0].sum(dim=1))
    assert grid.shape == (2, 1, 4, 4) and torch.isfinite(grid).all()
    with pytest.raises(ValueError, match="discard_ratio"):
        AttentionRollout(model, discard_ratio=1.0)
    with pytest.raises(ValueError, match="head_fusion"):
        AttentionRollout(model, head_fusion="median")
