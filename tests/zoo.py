"""A shared zoo of small PyTorch nets, built in the tests, with the patterns of the real model zoos.

Every builder is ``builder(seed: int = 0, *, float64: bool = False) -> nn.Module`` and returns a
model in eval mode whose weights (and BatchNorm running statistics, randomised so that BN's effective
bias is not zero) depend only on ``seed``. Every model takes ``(N, 3, 16, 16)`` images (:data:`INPUT_SHAPE`,
:func:`zoo_input`) and scores :data:`NUM_CLASSES` classes. The names, signatures and module names
(``state_dict`` keys) are stable: the Keras twins in ``tests/zoo_keras.py`` copy weights by them.

=================  ==========================================================================
``plain_cnn``      Conv-BN-ReLU x2 with a max-pool, Flatten, Linear: a VGG-style plain CNN.
``fused_bn_act``   Conv + ``BatchNormAct2d`` (a ``BatchNorm2d`` subclass with ``drop``/``act``
                   children whose forward also applies the ReLU: timm's pattern), GAP, Linear.
``residual_net``   A ResNet: stem, an identity block and a strided block with a 1x1 conv
                   shortcut, GAP, Linear.
``softmax_head``   ``plain_cnn``'s layers followed by ``nn.Softmax(dim=1)``: returns probabilities.
``model_output``   ``plain_cnn`` inside a wrapper returning a ``ClassifierOutput`` (a dataclass
                   that is an ``OrderedDict``, like transformers' ``ModelOutput``) with ``logits``.
``linear_head``    Conv-ReLU trunk, then global average pool + Linear (``LinearHead``): the
                   premise of the CAM closed forms, dScore_k/dA_cij = W_kc / (H W).
=================  ==========================================================================

:data:`ZOO` holds those six CNNs; :data:`VIT_ZOO` holds ``tiny_vit``, a timm-layout ViT (a class token
and position embedding as parameters on the container, attention blocks with a ``qkv`` Linear and
``num_heads``, LayerNorm, GELU) for the attention-rollout methods.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from .nets import randomize_batchnorm

INPUT_SHAPE: tuple[int, int, int] = (3, 16, 16)
NUM_CLASSES = 4
WIDTH = 6


def zoo_input(n: int = 2, seed: int = 0, *, float64: bool = False) -> torch.Tensor:
    """``(n, 3, 16, 16)`` uniform noise in [0, 1) from its own generator (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *INPUT_SHAPE), generator=generator, dtype=torch.float64)
    return x if float64 else x.float()


def _build(make: Callable[[], nn.Module], seed: int, float64: bool) -> nn.Module:
    """``make()`` under ``torch.manual_seed(seed)`` in a forked RNG (the caller's global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    randomize_batchnorm(model, seed)
    return model.to(torch.float64 if float64 else torch.float32).eval()


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``, trimmed: a BN that owns parameters, has children and applies its act."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, relu (``shortcut`` is a 1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(WIDTH, WIDTH)
        self.layer2 = BasicBlock(WIDTH, 2 * WIDTH, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * WIDTH, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class LinearHead(nn.Module):
    """Global average pool + Linear."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.mean(dim=(2, 3)))


@dataclass
class ClassifierOutput(OrderedDict):  # type: ignore[type-arg]
    """Shaped like transformers' ``ModelOutput``: a dataclass that is an OrderedDict of its set fields."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


class ModelOutputNet(nn.Module):
    """``self.net`` is a ``plain_cnn``; forward returns ``ClassifierOutput(logits=, hidden_states=)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _plain_layers()

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        logits = self.net(x)
        return ClassifierOutput(logits=logits, hidden_states=x.mean(dim=(1, 2, 3)))


def _plain_layers() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, WIDTH, 3, padding=1),
        nn.BatchNorm2d(WIDTH),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(WIDTH, 2 * WIDTH, 3, padding=1),
        nn.BatchNorm2d(2 * WIDTH),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * WIDTH * 4 * 4, NUM_CLASSES),
    )


def plain_cnn(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """Sequential: Conv(3->6)-BN-ReLU-MaxPool, Conv(6->12)-BN-ReLU-MaxPool, Flatten, Linear(192->4)."""
    return _build(_plain_layers, seed, float64)


def fused_bn_act(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """Sequential: Conv-BatchNormAct2d, Conv(stride 2)-BatchNormAct2d, LinearHead (GAP + Linear)."""
    return _build(
        lambda: nn.Sequential(
            nn.Conv2d(3, WIDTH, 3, padding=1),
            BatchNormAct2d(WIDTH),
            nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1),
            BatchNormAct2d(WIDTH),
            LinearHead(WIDTH, NUM_CLASSES),
        ),
        seed,
        float64,
    )


def residual_net(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """:class:`ResidualNet`: stem conv-BN-ReLU, ``layer1`` (identity shortcut), ``layer2`` (stride 2)."""
    return _build(ResidualNet, seed, float64)


def softmax_head(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """``plain_cnn``'s layers (same weights for the same seed) + ``nn.Softmax(dim=1)`` as module ``10``."""
    return _build(lambda: _plain_layers().append(nn.Softmax(dim=1)), seed, float64)


def model_output(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """:class:`ModelOutputNet`: ``plain_cnn`` (same weights for the same seed) as ``net``."""
    return _build(ModelOutputNet, seed, float64)


def linear_head(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """Sequential(trunk, LinearHead): trunk = Conv(3->6)-ReLU, Conv(6->6, stride 2)-ReLU (layer ``0``)."""

    def make() -> nn.Module:
        trunk = nn.Sequential(
            nn.Conv2d(3, WIDTH, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        return nn.Sequential(trunk, LinearHead(WIDTH, NUM_CLASSES))

    return _build(make, seed, float64)


class Attention(nn.Module):
    """timm's ``Attention`` layout: ``qkv`` Linear, ``num_heads``, ``scale``, ``proj``; fused SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """4 x 4 patches of a 16 x 16 image (16 tokens + the class token), width 12, 2 blocks of 2 heads."""

    def __init__(self, dim: int = 12, patch: int = 4) -> None:
        super().__init__()
        tokens = (INPUT_SHAPE[1] // patch) * (INPUT_SHAPE[2] // patch)
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.5)
        self.blocks = nn.Sequential(Block(dim, 2), Block(dim, 2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def tiny_vit(seed: int = 0, *, float64: bool = False) -> nn.Module:
    """:class:`TinyViT`: a timm-layout ViT (class token on the container, ``blocks.i.attn.qkv``)."""
    return _build(TinyViT, seed, float64)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "plain_cnn": plain_cnn,
    "fused_bn_act": fused_bn_act,
    "residual_net": residual_net,
    "softmax_head": softmax_head,
    "model_output": model_output,
    "linear_head": linear_head,
}

VIT_ZOO: dict[str, Callable[..., nn.Module]] = {"tiny_vit": tiny_vit}


def logits_of(output: object) -> torch.Tensor:
    """The scores of a zoo model's output (``.logits`` of a ModelOutput); not the softmax head's logits."""
    if isinstance(output, ClassifierOutput):
        assert output.logits is not None
        return output.logits
    assert isinstance(output, torch.Tensor)
    return output
