"""Every image explainer that should work on a vision transformer, on Hugging Face ViT and DeiT.

Random-weight models from tiny configs (no downloads): a 32x32 image in 8x8 patches, a 4x4 grid,
1 prefix token (ViT: class) or 2 (DeiT: class + distillation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from bbdecoder import (  # noqa: E402
    AblationCAM,
    AttentionRollout,
    CompletenessError,
    EigenCAM,
    FullGrad,
    GradCAM,
    GradCAMPlusPlus,
    GradientRollout,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    SimpleFullGrad,
    XGradCAM,
    tokens,
)
from bbdecoder.attribution.fullgrad import non_bias_constants  # noqa: E402

CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=3,
)

# (model factory, name of the backbone attribute, prefix tokens)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, int]] = {
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**CONFIG)), "vit", 1),
    "deit": (
        lambda: transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**CONFIG)),
        "deit",
        2,
    ),
    "deit-plain": (
        lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**CONFIG)),
        "deit",
        2,
    ),
}

CAMS = [GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM, EigenCAM, ScoreCAM, AblationCAM]


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind][0]().eval()


def _inputs(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grads": [p.requires_grad for p in model.parameters()],
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
        "attn": model.config._attn_implementation,
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _fingerprint(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["modes"] == before["modes"]
    assert after["grads"] == before["grads"]
    assert after["hooks"] == before["hooks"] == 0
    assert after["attn"] == before["attn"]
    assert all(p.grad is None for p in model.parameters())


def _explainers() -> list[tuple[str, Callable[[nn.Module], Any]]]:
    made: list[tuple[str, Callable[[nn.Module], Any]]] = [(c.__name__, c) for c in CAMS]
    made += [
        ("SimpleFullGrad", SimpleFullGrad),
        ("AttentionRollout", AttentionRollout),
        ("GradientRollout", GradientRollout),
    ]
    return made


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize(("name", "make"), _explainers(), ids=[n for n, _ in _explainers()])
def test_explainer_runs_on_vit_and_leaves_it_unchanged(kind: str, name: str, make: Any) -> None:
    model = _model(kind)
    model.train()  # a mode the explainer must restore
    before = _fingerprint(model)
    x = _inputs()
    maps = make(model).saliency(x, target=1)
    assert maps.shape == (2, 1, 32, 32), name
    assert torch.isfinite(maps).all(), name
    # A map, not a constant: the default layer and reshape pick up a spatial signal.
    assert (maps.flatten(1).amax(1) > maps.flatten(1).amin(1)).all(), name
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("cam_class", CAMS, ids=[c.__name__ for c in CAMS])
def test_default_cam_layer_is_the_last_blocks_input_with_the_token_reshape(kind: str, cam_class: Any) -> None:
    model = _model(kind)
    _, base, prefix = MODELS[kind]
    x = _inputs()
    default = cam_class(model)
    got = default.saliency(x, target=0)
    assert default.layer_names == [f"{base}.layers.0"]
    assert default.reshape == tokens(prefix=prefix)
    explicit = cam_class(model, f"{base}.layers.0", reshape=tokens(prefix=prefix)).saliency(x, target=0)
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_last_blocks_output_gives_an_empty_gradcam(kind: str) -> None:
    """Why the default is not the last block's output: only the class token(s) reach the head."""
    model = _model(kind)
    _, base, prefix = MODELS[kind]
    cam = GradCAM(model, f"{base}.layers.1", reshape=tokens(prefix=prefix))
    with pytest.warns(UserWarning, match="gradient"):
        maps = cam.saliency(_inputs(), target=0)
    assert torch.count_nonzero(maps) == 0


def test_default_layer_prefers_a_users_tokens_reshape() -> None:
    model = _model("deit")
    cam = GradCAM(model, reshape=tokens(prefix=2, grid=(4, 4)))
    cam.saliency(_inputs(), target=0)
    assert cam.layer_names == ["deit.layers.0"]
    assert cam.reshape == tokens(prefix=2, grid=(4, 4))


def test_cnn_default_layer_is_unchanged() -> None:
    cnn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    cam = GradCAM(cnn)
    cam.saliency(_inputs(), target=0)
    assert cam.layer_names == ["1"]
    assert cam.reshape is None


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fullgrad_refuses_vit_naming_layernorm_and_gelu(kind: str) -> None:
    model = _model(kind)
    before = _fingerprint(model)
    with pytest.raises(CompletenessError) as info:
        FullGrad(model, im_size=(3, 32, 32))
    message = str(info.value)
    for word in ("LayerNorm", "GELU", "attention/softmax", "SimpleFullGrad"):
        assert word in message, word
    assert "ReLU6" in message  # the generic list still names it
    _assert_unchanged(model, before)


def test_non_bias_constants_scan_module_types() -> None:
    assert non_bias_constants(_model("vit")) == ["LayerNorm", "GELU", "attention/softmax"]
    assert non_bias_constants(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU6())) == ["ReLU6"]
    assert non_bias_constants(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())) == []


class _Block(nn.Module):
    """timm's pre-norm ViT block layout: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimmStyleViT(nn.Module):
    """timm's ViT layout: patch_embed.patch_size, cls_token and register tokens on the container,
    blocks in an nn.Sequential, a final norm, the class token to the head."""

    def __init__(self, depth: int = 3, dim: int = 16, registers: int = 2) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(dim, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.reg_token = nn.Parameter(torch.randn(1, registers, dim))
        self.blocks = nn.Sequential(*[_Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        n = t.shape[0]
        t = torch.cat([self.cls_token.expand(n, -1, -1), self.reg_token.expand(n, -1, -1), t], dim=1)
        return self.head(self.norm(self.blocks(t))[:, 0])


@pytest.mark.parametrize("depth", [1, 3])
def test_default_cam_layer_on_a_timm_style_vit_with_registers(depth: int) -> None:
    torch.manual_seed(0)
    model = _TimmStyleViT(depth=depth).eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    cam = GradCAM(model)
    got = cam.saliency(x, target=2)
    assert cam.reshape == tokens(prefix=3)
    # One block: its first norm's input is concatenated in the forward, no module's output, so the
    # norm's own output (pytorch-grad-cam's blocks[-1].norm1).
    layer = "blocks.0.norm1" if depth == 1 else f"blocks.{depth - 2}"
    assert cam.layer_names == [layer]
    assert got.shape == (2, 1, 32, 48)
    assert (got.flatten(1).amax(1) > 0).all()
    explicit = GradCAM(model, layer, reshape=tokens(prefix=3, grid=(4, 6))).saliency(x, target=2)
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)
