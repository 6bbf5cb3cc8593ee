"""CAM layer choice: block names, globs, lists, IDs, the trunk default, reshape (channels-last, tokens)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import GradCAM, LayerCAM, LayerIndex, channels_last, tokens
from bbdecoder.hooks import count_hooks

from .cam_nets import LinearHead, nonlinear_net, split_net, trunk
from .nets import ResNetStyle, randomize_batchnorm


def _resnet() -> ResNetStyle:
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetStyle()).double().eval()
    assert isinstance(model, ResNetStyle)
    return model


def _oracle(features: torch.Tensor, head: object, targets: list[int]) -> torch.Tensor:
    """Grad-CAM from a split model: A = features (no hooks), its gradient by autograd through the head."""
    a = features.detach().requires_grad_(True)
    out = head(a)  # type: ignore[operator]
    (grad,) = torch.autograd.grad(out[torch.arange(len(targets)), torch.tensor(targets)].sum(), a)
    return torch.relu((grad.mean(dim=(2, 3), keepdim=True) * a.detach()).sum(1, keepdim=True))


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low)).view_as(maps)


def test_a_block_name_is_a_layer() -> None:
    model = _resnet()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    targets = [0, 2, 4]
    with torch.no_grad():
        a1 = model.layer1(model.relu(model.bn(model.stem(x))))
    expected = _oracle(a1, lambda a: model.fc(torch.flatten(model.pool(model.layer2(a)), 1)), targets)
    torch.testing.assert_close(GradCAM(model, "layer1").layer_map(x, targets), expected)
    # layer2's output is its final ReLU's output: the block and the leaf give the same map
    torch.testing.assert_close(
        GradCAM(model, "layer2").layer_map(x, targets),
        GradCAM(model, model.layer2.relu).layer_map(x, targets),
    )
    # a leaf ID, as `bbdecoder layers` numbers them
    leaf_id = LayerIndex(model).by_module(model.layer2.relu).id  # type: ignore[union-attr]
    torch.testing.assert_close(
        GradCAM(model, leaf_id).layer_map(x, targets), GradCAM(model, "layer2").layer_map(x, targets)
    )
    with pytest.raises(KeyError, match="did you mean 'layer1'"):
        GradCAM(model, "layer_1")


def test_several_layers_are_averaged_never_truncated() -> None:
    model = nonlinear_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m1 = GradCAM(model, "0.1").layer_map(x, [1, 3])
    m2 = GradCAM(model, "0.3").layer_map(x, [1, 3])
    assert (
        m1.shape[2:] != m2.shape[2:]
        and (m1.flatten(1).amax(1) > 0).all()
        and (m2.flatten(1).amax(1) > 0).all()
    )
    up = [F.interpolate(_minmax(m), size=(16, 16), mode="bilinear", align_corners=False) for m in (m1, m2)]
    expected = _minmax((up[0] + up[1]) / 2)
    both = GradCAM(model, ["0.1", "0.3"])
    torch.testing.assert_close(both.saliency(x, [1, 3]), expected)
    assert both.layer_names == ["0.1", "0.3"]
    # the pytorch-grad-cam spelling and a glob give the same layers
    alias = GradCAM(model=model, target_layers=[model[0][1], model[0][3]])
    torch.testing.assert_close(alias.saliency(x, [1, 3]), expected)
    assert GradCAM(model, "0.[13]").layer_names == ["0.1", "0.3"]
    assert not torch.allclose(expected, GradCAM(model, "0.1").saliency(x, [1, 3]))
    with pytest.raises(ValueError, match="layer_maps"):
        both.layer_map(x, [1, 3])
    with pytest.raises(TypeError, match="not both"):
        GradCAM(model, "0.1", target_layers=[model[0][3]])
    with pytest.raises(ValueError, match="empty"):
        GradCAM(model, [])


class SharedConv(nn.Module):
    """One conv applied twice: its last call is the deeper map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = LinearHead(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(torch.tanh(self.conv(x)))


def test_a_module_called_twice_contributes_its_last_call() -> None:
    torch.manual_seed(0)
    model = SharedConv().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        first = model.conv(torch.relu(model.stem(x)))
        second = model.conv(torch.relu(first))
    expected = _oracle(second, lambda a: model.head(torch.tanh(a)), [0, 2])
    ours = GradCAM(model, model.conv).layer_map(x, [0, 2])
    torch.testing.assert_close(ours, expected)
    wrong = _oracle(first, lambda a: model.head(torch.tanh(model.conv(torch.relu(a)))), [0, 2])
    assert not torch.allclose(ours, wrong)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, a channels-last MLP scaled by gamma (layer scale), residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma
        return x + branch.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stages = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm_pre = nn.Identity()
        self.head_norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.stages(self.stem(x)))
        return self.fc(self.head_norm(x.mean(dim=(2, 3))))


def test_default_layer_is_the_block_output_not_its_residual_branch() -> None:
    torch.manual_seed(0)
    model = ConvNeXtLike().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    cam = GradCAM(model)
    ours = cam.layer_map(x, [0, 3])
    assert cam.layer_names == ["stages.1"]
    with torch.no_grad():
        features = model.stages(model.stem(x))
    expected = _oracle(features, lambda a: model.fc(model.head_norm(a.mean(dim=(2, 3)))), [0, 3])
    torch.testing.assert_close(ours, expected)
    assert count_hooks(model) == 0


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused BN + activation: a BatchNorm2d subclass with a child."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvBnAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = BatchNormAct2d(cout)
        self.aa = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aa(self.bn1(self.conv(x)))


class MobileNetV3Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ConvBnAct(3, 8, 2), ConvBnAct(8, 12))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(12, 16, 1)  # runs after the pool: 1x1
        self.act2 = nn.Hardswish()
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.act2(self.conv_head(self.global_pool(self.blocks(x))))))


def test_default_layer_skips_pass_through_modules() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(MobileNetV3Like()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    cam = GradCAM(model)
    ours = cam.layer_map(x, [1, 2])
    assert cam.layer_names == ["blocks.1.bn1.act"]
    assert cam.layer is not model.blocks[1].aa
    torch.testing.assert_close(ours, GradCAM(model, "blocks.1").layer_map(x, [1, 2]))


class InPlaceBlock(nn.Module):
    """torchvision's BasicBlock: ``out += identity`` and one in-place ReLU module used twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def test_default_layer_with_in_place_residuals() -> None:
    torch.manual_seed(0)
    block = InPlaceBlock(6)
    model = (
        randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), block, LinearHead(6, 3)))
        .double()
        .eval()
    )
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cam = GradCAM(model)
    ours = cam.layer_map(x, [0, 2])
    assert cam.layer is block.relu  # its last call: the block's output
    with torch.no_grad():
        features = model[1](model[0](x))
    torch.testing.assert_close(ours, _oracle(features, model[2], [0, 2]))
    # bn2's output is changed in place afterwards: its map is the pre-residual one, taken before the add
    with torch.no_grad():
        pre = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(model[0](x))))))
    head = lambda a: model[2](torch.relu(a + model[0](x)))  # noqa: E731
    torch.testing.assert_close(GradCAM(model, block.bn2).layer_map(x, [0, 2]), _oracle(pre, head, [0, 2]))


class ToNHWC(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.permute(0, 2, 3, 1)


class ChannelsLastNet(nn.Module):
    """``split_net`` with the trunk's output handed over channels-last (a Swin-style stage)."""

    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.trunk, self.head = inner[0], inner[1]
        self.to_nhwc = ToNHWC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.to_nhwc(self.trunk(x)).permute(0, 3, 1, 2))


class ToTokens(nn.Module):
    """(N, C, H, W) -> (N, 1 + HW, C) with a class token in front (ViT's layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, channels))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(a.shape[0], -1, -1), a.flatten(2).transpose(1, 2)], dim=1)


class TokenNet(nn.Module):
    def __init__(self, inner: nn.Sequential, channels: int) -> None:
        super().__init__()
        self.trunk, self.head = inner[0], inner[1]
        self.to_tokens = ToTokens(channels)
        self.cls_head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.trunk(x)
        t = self.to_tokens(a)
        patches = t[:, 1:].transpose(1, 2).reshape(a.shape)
        return self.head(patches) + self.cls_head(t[:, 0])


@pytest.mark.parametrize("cls", [GradCAM, LayerCAM])
def test_channels_last_and_token_layers_equal_the_channel_first_net(cls: type[GradCAM]) -> None:
    inner = split_net(width=16).double()
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64)
    targets = [0, 3, 1]
    reference = cls(inner, inner[0])
    expected, expected_saliency = reference.layer_map(x, targets), reference.saliency(x, targets)

    nhwc = ChannelsLastNet(inner)
    for reshape in ("channels_last", channels_last(), lambda t: t.permute(0, 3, 1, 2)):
        cam = cls(nhwc, nhwc.to_nhwc, reshape=reshape)
        torch.testing.assert_close(cam.layer_map(x, targets), expected)
    torch.testing.assert_close(cls(nhwc, reshape="channels_last").saliency(x, targets), expected_saliency)

    tok = TokenNet(inner, 16).double()
    cam = cls(tok, "to_tokens", reshape=tokens(prefix=1))  # 30 patches on a 6 x 5 grid (the input's 12:10)
    torch.testing.assert_close(cam.layer_map(x, targets), expected)
    torch.testing.assert_close(cam.saliency(x, targets), expected_saliency)
    # pytorch-grad-cam's name, and the default layer with a reshape
    vit_style = cls(tok, target_layers=[tok.to_tokens], reshape_transform=tokens(prefix=1, grid=(6, 5)))
    torch.testing.assert_close(vit_style.layer_map(x, targets), expected)
    default = cls(tok, reshape=tokens(prefix=1))
    torch.testing.assert_close(default.layer_map(x, targets), expected)
    assert default.layer_names == ["to_tokens"]


def test_layers_that_are_not_channel_first_get_a_clear_error() -> None:
    inner = split_net(width=16).double()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    tok = TokenNet(inner, 16).double()
    with pytest.raises(ValueError, match=r"'to_tokens' outputs shape \(2, 31, 16\).*reshape="):
        GradCAM(tok, "to_tokens").layer_map(x)
    with pytest.raises(ValueError, match=r"31 tokens minus prefix=0 do not fill a grid.*prefix=1"):
        GradCAM(tok, "to_tokens", reshape="tokens").layer_map(x)
    # the default on a net whose last map is channels-last: refused, naming the fix
    nhwc = ChannelsLastNet(inner)
    with pytest.raises(ValueError, match=r"'to_nhwc'.*\(1, 6, 5, 16\).*reshape='channels_last'"):
        GradCAM(nhwc).layer_map(x)
    with pytest.raises(ValueError, match="unknown reshape"):
        GradCAM(tok, reshape="nhwc")
    assert count_hooks(tok) == 0 and count_hooks(nhwc) == 0


class ClassTokenHead(nn.Module):
    """Only the class token reaches the logits, as after a ViT's last block."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = trunk(width=16)
        self.to_tokens = ToTokens(16)
        self.mix = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.to_tokens(self.trunk(x))
        return self.fc(self.mix(t)[:, 0])


def test_a_layer_the_score_does_not_depend_on_is_flagged() -> None:
    model = ClassTokenHead().double().eval()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"zero at every position.*blocks\[-1\]\.norm1"):
        heat = GradCAM(model, "to_tokens", reshape=tokens(prefix=1)).saliency(x)
    assert torch.equal(heat, torch.zeros_like(heat))


def test_one_dimensional_signals() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv1d(5, 5, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double().eval()  # fmt: skip
    x = torch.randn(2, 2, 20, dtype=torch.float64)
    cam = GradCAM(model)
    with torch.no_grad():
        features = model[:4](x)
    a = features.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model[4:](a)[torch.arange(2), torch.tensor([0, 2])].sum(), a)
    expected = torch.relu((grad.mean(dim=2, keepdim=True) * features).sum(1, keepdim=True))
    torch.testing.assert_close(cam.layer_map(x, [0, 2]), expected)
    assert cam.layer is model[3]
    assert cam.saliency(x, [0, 2]).shape == (2, 1, 20)
