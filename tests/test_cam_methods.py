"""Each CAM against an independent oracle: closed forms, a hand-made SVD, brute-force loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)

from .cam_nets import nonlinear_net, split_net

TARGETS = [0, 3, 1]


def _setup(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model, inputs, the trunk's output A (no hooks) and the analytic gradient dS/dA = W_kc / (HW)."""
    model = split_net(seed)
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a = model[0](x)
    weight = model[1].fc.weight[torch.tensor(TARGETS)]  # (N, C)
    g = (weight / (a.shape[2] * a.shape[3]))[:, :, None, None].expand_as(a)
    return model, x, a, g.detach()


def test_gradcam_closed_form() -> None:
    model, x, a, g = _setup()
    expected = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    torch.testing.assert_close(GradCAM(model, model[0]).layer_map(x, TARGETS), expected)


def test_gradcam_plusplus_closed_form() -> None:
    model, x, a, g = _setup()
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    alpha = g**2 / (2 * g**2 + sum_a * g**3 + 1e-6)
    alpha = torch.where(g != 0, alpha, 0.0)
    weights = (torch.relu(g) * alpha).sum(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * a).sum(1, keepdim=True))
    ours = GradCAMPlusPlus(model, model[0]).layer_map(x, TARGETS)
    torch.testing.assert_close(ours, expected)
    # with a constant gradient g the weight reduces to HW g^2 / (2g + sum_a g^2) * relu(g)/g ...
    hw = a.shape[2] * a.shape[3]
    g0 = g[:, :, 0, 0]
    simple = torch.where(g0 > 0, hw * g0**3 / (2 * g0**2 + sum_a[:, :, 0, 0] * g0**3 + 1e-6), 0.0)
    torch.testing.assert_close(weights[:, :, 0, 0], simple)


def test_layercam_closed_form() -> None:
    model, x, a, g = _setup()
    expected = torch.relu((torch.relu(g) * a).sum(1, keepdim=True))
    torch.testing.assert_close(LayerCAM(model, model[0]).layer_map(x, TARGETS), expected)


def test_xgradcam_closed_form() -> None:
    model, x, a, g = _setup()
    weights = (g * a).sum(dim=(2, 3), keepdim=True) / (a.sum(dim=(2, 3), keepdim=True) + 1e-7)
    expected = torch.relu((weights * a).sum(1, keepdim=True))
    torch.testing.assert_close(XGradCAM(model, model[0]).layer_map(x, TARGETS), expected)


def test_hirescam_is_elementwise_gradient_times_activation() -> None:
    model = nonlinear_net()
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64)
    a = model[0](x).detach().requires_grad_(True)
    model[1](a)[torch.arange(3), torch.tensor(TARGETS)].sum().backward()
    assert a.grad is not None
    expected = torch.relu((a.grad * a.detach()).sum(1, keepdim=True))
    ours = HiResCAM(model, model[0]).layer_map(x, TARGETS)
    torch.testing.assert_close(ours, expected)
    # the gradient varies over positions here, so HiResCAM is not Grad-CAM
    assert not torch.allclose(ours, GradCAM(model, model[0]).layer_map(x, TARGETS))


def _eigen_oracle(a: torch.Tensor) -> torch.Tensor:
    maps = []
    for sample in a:
        m = sample.reshape(sample.shape[0], -1).T  # (positions, C)
        m = m - m.mean(dim=0)
        _, _, vh = torch.linalg.svd(m, full_matrices=True)
        v = vh[0] if vh[0].sum() >= 0 else -vh[0]
        maps.append((m @ v).reshape(sample.shape[1:]))
    return torch.relu(torch.stack(maps)).unsqueeze(1)


def test_eigencam_is_the_first_principal_component() -> None:
    model, x, a, _ = _setup()
    ours = EigenCAM(model, model[0]).layer_map(x)
    torch.testing.assert_close(ours, _eigen_oracle(a))
    assert (ours > 0).any()
    # gradient-free: the target does not matter
    torch.testing.assert_close(EigenCAM(model, model[0]).layer_map(x, [1, 1, 1]), ours)


def test_eigencam_sign_follows_the_activation() -> None:
    # one channel carries a bright blob: the map must light it up, not its complement
    a = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    a[0, :, 1:3, 1:3] = torch.tensor([3.0, 2.0, 1.0])[:, None, None]
    a += 0.01 * torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(108, 2)).double()
    model = nn.Sequential(_Const(a), model)
    cam = EigenCAM(model, model[0]).layer_map(torch.zeros(1, 1, 6, 6, dtype=torch.float64))[0, 0]
    assert cam[1:3, 1:3].min() > cam.max() * 0.5
    assert cam[4:, 4:].max() == 0


class _Const(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1, -1, -1) + 0 * x.sum()


def _score_oracle(model: nn.Sequential, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    up = nn.UpsamplingBilinear2d(size=x.shape[2:])
    maps = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            a = model[0](x[n : n + 1])
            scores = []
            for c in range(a.shape[1]):
                mask = up(a[:, c : c + 1])
                mask = (mask - mask.min()) / (mask.max() - mask.min() + 1e-8)
                scores.append(model(x[n : n + 1] * mask)[0, targets[n]])
            w = torch.softmax(torch.stack(scores), dim=0)
            maps.append(torch.relu((w[:, None, None] * a[0]).sum(0, keepdim=True)))
    return torch.stack(maps)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_scorecam_equals_a_brute_force_loop(batch_size: int) -> None:
    model = nonlinear_net()
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64)
    ours = ScoreCAM(model, model[0], batch_size=batch_size).layer_map(x, TARGETS)
    torch.testing.assert_close(ours, _score_oracle(model, x, TARGETS))


def _ablation_oracle(model: nn.Sequential, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    maps = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            a = model[0](x[n : n + 1])
            y = model[1](a)[0, targets[n]]
            weights = []
            for c in range(a.shape[1]):
                ablated = a.clone()
                ablated[:, c] = 0
                weights.append((y - model[1](ablated)[0, targets[n]]) / y)
            w = torch.stack(weights)
            maps.append(torch.relu((w[:, None, None] * a[0]).sum(0, keepdim=True)))
    return torch.stack(maps)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_ablationcam_equals_a_brute_force_loop(batch_size: int) -> None:
    model = nonlinear_net()
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64)
    ours = AblationCAM(model, model[0], batch_size=batch_size).layer_map(x, TARGETS)
    expected = _ablation_oracle(model, x, TARGETS)
    assert (expected > 0).any()
    torch.testing.assert_close(ours, expected)


def test_ablationcam_on_a_token_layer_ablates_the_right_channel() -> None:
    # the layer outputs tokens (N, L, C); the channel is the last axis of the raw output
    model = nonlinear_net()
    tok = _TokenNet(model)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    ours = AblationCAM(tok, tok.to_tokens, reshape="tokens").layer_map(x, TARGETS[:2])
    torch.testing.assert_close(ours, _ablation_oracle(model, x, TARGETS[:2]))


class _TokenNet(nn.Module):
    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.trunk, self.head = inner[0], inner[1]
        self.to_tokens = ToTokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.trunk(x)
        t = self.to_tokens(a)  # (N, HW, C), channels last
        return self.head(t.transpose(1, 2).reshape(a.shape))


class ToTokens(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.flatten(2).transpose(1, 2)


def test_scorecam_masks_in_pixel_space_before_the_input_transform() -> None:
    from bbdecoder import Normalize

    model = nonlinear_net()
    norm = Normalize([0.5, 0.2, -0.1], [2.0, 1.0, 0.5]).double()
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64)
    # the oracle masks the raw pixels, then normalises: layer = the trunk after the normalisation
    expected_model = nn.Sequential(nn.Sequential(norm, model[0]), model[1])
    ours = ScoreCAM(model, model[0], input_transform=norm).layer_map(x, [1, 2])
    torch.testing.assert_close(ours, _score_oracle(expected_model, x, [1, 2]))


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    model = nonlinear_net()
    x = torch.randn(1, 3, 12, 10, dtype=torch.float64)
    ScoreCAM(model, model[0]).layer_map(x, 0)
    assert "Score" not in capsys.readouterr().err  # stderr is not a TTY under pytest
    ScoreCAM(model, model[0], progress=True, batch_size=2).layer_map(x, 0)
    assert "ScoreCAM" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size"):
        AblationCAM(model, batch_size=0)


def test_callable_target_per_row() -> None:
    model = nonlinear_net()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    by_class = ScoreCAM(model, model[0], batch_size=4).layer_map(x, 2)
    by_callable = ScoreCAM(model, model[0], batch_size=4).layer_map(x, lambda out: out[:, 2])
    torch.testing.assert_close(by_callable, by_class)
    torch.testing.assert_close(
        AblationCAM(model, model[0]).layer_map(x, lambda out: out[:, 2]),
        AblationCAM(model, model[0]).layer_map(x, 2),
    )


def test_saliency_resizes_each_method_like_gradcam() -> None:
    model = nonlinear_net()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    for cls in (GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM, EigenCAM):
        cam = cls(model, model[0])
        raw = cam.layer_map(x, [1, 2])
        up = F.interpolate(raw, size=(12, 10), mode="bilinear", align_corners=False).flatten(1)
        low, high = up.min(1, keepdim=True).values, up.max(1, keepdim=True).values
        expected = ((up - low) / (high - low)).view(2, 1, 12, 10)
        torch.testing.assert_close(cam.saliency(x, [1, 2]), expected)


def test_ablationcam_ablates_the_last_call_of_a_shared_module() -> None:
    from .test_cam_layers import SharedConv

    torch.manual_seed(0)
    model = SharedConv().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    targets = [0, 2]
    maps = []
    with torch.no_grad():
        for n in range(2):
            second = model.conv(torch.relu(model.conv(torch.relu(model.stem(x[n : n + 1])))))
            y = model.head(torch.tanh(second))[0, targets[n]]
            weights = []
            for c in range(second.shape[1]):
                ablated = second.clone()
                ablated[:, c] = 0
                weights.append((y - model.head(torch.tanh(ablated))[0, targets[n]]) / y)
            w = torch.stack(weights)
            maps.append(torch.relu((w[:, None, None] * second[0]).sum(0, keepdim=True)))
    ours = AblationCAM(model, model.conv, batch_size=3).layer_map(x, targets)
    assert bool((ours > 0).any())
    torch.testing.assert_close(ours, torch.stack(maps))
