"""FullGrad: completeness on VGG/ResNet/DenseNet-style nets, oracles, mutations, saliency reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bbdecoder.backends.layers_torch as fullgrad_module  # where the torch hooks read the biases
from bbdecoder.attribution import CompletenessError, FullGrad, Normalize, SimpleFullGrad, SmoothFullGrad
from bbdecoder.attribution.bias_layers import effective_bias
from bbdecoder.hooks import count_hooks

from .nets import make_net, randomize_batchnorm

TARGETS = [0, 1, 2, 3]


def _inputs(
    dtype: torch.dtype, n: int = 4, shape: tuple[int, ...] = (3, 16, 16), seed: int = 1
) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", ["vgg", "resnet", "densenet"])
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_completeness_with_per_sample_targets(kind: str, dtype: torch.dtype, bound: float) -> None:
    model = make_net(kind, dtype=dtype)
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    x = _inputs(dtype)
    decomposition = fullgrad.decompose(x, TARGETS)
    with torch.no_grad():
        expected = model(x)[torch.arange(4), torch.tensor(TARGETS)]
    torch.testing.assert_close(decomposition.scores, expected, rtol=0, atol=0)
    assert decomposition.relative_error().max() < bound
    # the bias terms matter: without them the sum is far off
    input_only = (decomposition.inputs * decomposition.input_gradient).flatten(1).sum(1)
    assert ((input_only - expected).abs() / expected.abs()).max() > 1e-3


def _hook_free_total(model: nn.Module, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    """F summed over the batch from ordinary parameter gradients: sum(x dF/dx) + sum_l b_l . dF/db_l."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    score = model(x)[torch.arange(len(target)), torch.tensor(target)].sum()
    score.backward()
    total = (x * x.grad).sum()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            total = total + (module.bias.grad * module.bias).sum()
        elif isinstance(module, nn.BatchNorm2d):
            total = total + (module.bias.grad * effective_bias(module)).sum()
    model.zero_grad(set_to_none=True)
    return total.detach()


@pytest.mark.parametrize("kind", ["vgg", "resnet", "densenet"])
def test_decomposition_equals_parameter_gradient_oracle(kind: str) -> None:
    model = make_net(kind)
    x = _inputs(torch.float64)
    decomposition = FullGrad(model, im_size=(3, 16, 16)).decompose(x, TARGETS)
    torch.testing.assert_close(
        decomposition.totals().sum(), _hook_free_total(model, x, TARGETS), rtol=1e-12, atol=0
    )
    # per layer: channel sums of the bias gradient are dF/db * b (each module runs once here)
    modules = dict(model.named_modules())
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    model(xg)[torch.arange(4), torch.tensor(TARGETS)].sum().backward()
    for name, bias_gradient in zip(decomposition.layer_names, decomposition.bias_gradients, strict=False):
        module = modules[name]
        per_channel = (
            bias_gradient.transpose(0, 1).flatten(1).sum(1)
            if bias_gradient.dim() > 2
            else bias_gradient.sum(0)
        )
        param_grad = module.bias.grad
        torch.testing.assert_close(per_channel, param_grad * effective_bias(module), rtol=1e-10, atol=1e-12)
    model.zero_grad(set_to_none=True)


class ReversedDeclaration(nn.Module):
    """Layers declared in the opposite order to the one they run in, plus an unused head."""

    def __init__(self) -> None:
        super().__init__()
        self.unused_head = nn.Linear(8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 3)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class SharedConv(nn.Module):
    """One conv module called twice: it must contribute twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.inp(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.bn(self.shared(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("cls", [ReversedDeclaration, SharedConv])
def test_order_unused_and_shared_modules(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(cls()).double().eval()
    x = _inputs(torch.float64, n=3, shape=(3, 8, 8))
    decomposition = FullGrad(model, im_size=(3, 8, 8)).decompose(x, [0, 1, 2])
    assert decomposition.relative_error().max() < 1e-10
    assert "unused_head" not in decomposition.layer_names
    if cls is SharedConv:
        assert decomposition.layer_names.count("shared") == 2
        torch.testing.assert_close(decomposition.totals().sum(), _hook_free_total(model, x, [0, 1, 2]))


def test_biases_are_reread_after_load_state_dict() -> None:
    model = make_net("vgg")
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    x = _inputs(torch.float64)
    before = fullgrad.decompose(x, TARGETS)
    other = make_net("vgg", seed=7)
    model.load_state_dict(other.state_dict())
    after = fullgrad.decompose(x, TARGETS)
    fresh = FullGrad(other, im_size=(3, 16, 16)).decompose(x, TARGETS)
    assert after.relative_error().max() < 1e-10
    torch.testing.assert_close(after.totals(), fresh.totals())
    assert not torch.allclose(before.totals(), after.totals())


def test_channels_last_matches_contiguous() -> None:
    model = make_net("resnet")
    x = _inputs(torch.float64)
    reference = FullGrad(model, im_size=(3, 16, 16)).saliency(x, TARGETS)
    model_cl = make_net("resnet").to(memory_format=torch.channels_last)
    fullgrad = FullGrad(model_cl, im_size=(3, 16, 16))
    x_cl = x.to(memory_format=torch.channels_last)
    assert fullgrad.decompose(x_cl, TARGETS).relative_error().max() < 1e-10
    torch.testing.assert_close(fullgrad.saliency(x_cl, TARGETS), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_nets(dims: int) -> None:
    conv, bn, pool = {
        1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
        3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d),
    }[dims]
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(2, 4, 3, padding=1),
        bn(4),
        nn.ReLU(),
        pool(2),
        conv(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    spatial = (8,) * dims
    model(torch.zeros((1, 2, *spatial), dtype=torch.float64))  # materialise the lazy layer
    randomize_batchnorm(model).eval()
    fullgrad = FullGrad(model, im_size=(2, *spatial))
    x = _inputs(torch.float64, n=2, shape=(2, *spatial))
    assert fullgrad.decompose(x, [0, 2]).relative_error().max() < 1e-10
    saliency = fullgrad.saliency(x, [0, 2])
    assert saliency.shape == (2, 1, *spatial)
    torch.testing.assert_close(saliency, _reference_saliency(fullgrad, x, [0, 2]), rtol=1e-5, atol=1e-5)


class TokenMLP(nn.Module):
    """A Linear applied to (N, T, D) tokens: its bias broadcasts over the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.mlp = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        tokens = F.relu(self.mlp(tokens))
        return self.head(tokens.mean(dim=1))


def test_linear_on_tokens_broadcasts_bias_over_last_dim() -> None:
    torch.manual_seed(0)
    model = TokenMLP().double().eval()
    decomposition = FullGrad(model, im_size=(3, 16, 16)).decompose(_inputs(torch.float64, n=2), [1, 3])
    assert decomposition.relative_error().max() < 1e-10


def _mutant_no_running_mean(module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, nn.BatchNorm2d):
        return (module.bias - 0 * module.running_mean).detach()
    return effective_bias(module)


def _mutant_wrong_eps(module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, nn.BatchNorm2d):
        scale = module.weight / torch.sqrt(module.running_var + 1e-2)
        return (module.bias - module.running_mean * scale).detach()
    return effective_bias(module)


@pytest.mark.parametrize("mutant", [_mutant_no_running_mean, _mutant_wrong_eps])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mutations_of_the_batchnorm_bias_are_caught(monkeypatch: pytest.MonkeyPatch, mutant, dtype) -> None:
    model = make_net("resnet", dtype=dtype)
    FullGrad(model, im_size=(3, 16, 16))  # correct bias: passes
    monkeypatch.setattr(fullgrad_module, "effective_bias", mutant)
    with pytest.raises(CompletenessError) as info:
        FullGrad(model, im_size=(3, 16, 16))
    assert info.value.rel_error > 1e-3


def test_train_mode_batchnorm_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_net("vgg").train()

    def running_stats_even_in_train_mode(module: nn.Module) -> torch.Tensor | None:
        if isinstance(module, nn.BatchNorm2d):
            scale = module.weight / torch.sqrt(module.running_var + module.eps)
            return (module.bias - module.running_mean * scale).detach()
        return effective_bias(module)

    monkeypatch.setattr(fullgrad_module, "effective_bias", running_stats_even_in_train_mode)
    with pytest.raises(CompletenessError):
        FullGrad(model, im_size=(3, 16, 16), eval_mode=False).checkCompleteness(_inputs(torch.float64))
    assert model.training  # restored
    # the default (eval mode) passes on the same model and restores train mode
    FullGrad(model, im_size=(3, 16, 16)).checkCompleteness(_inputs(torch.float64))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("culprit", ["relu6", "layernorm", "gelu"])
def test_non_piecewise_linear_nets_raise_a_clear_error(culprit: str) -> None:
    torch.manual_seed(0)
    activation = {"relu6": nn.ReLU6(), "gelu": nn.GELU(), "layernorm": nn.ReLU()}[culprit]
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), activation]
    if culprit == "layernorm":
        layers.append(nn.LayerNorm([8, 8, 8]))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).double()
    if culprit == "relu6":
        with torch.no_grad():
            model[0].weight.mul_(30)  # drive ReLU6 into saturation
    with pytest.raises(CompletenessError) as info:
        FullGrad(model, im_size=(3, 8, 8))
    message = str(info.value)
    assert "relative error" in message and "SimpleFullGrad" in message
    assert f"{info.value.rel_error:.3e}" in message
    # SimpleFullGrad works on the same net
    assert SimpleFullGrad(model).saliency(_inputs(torch.float64, n=2, shape=(3, 8, 8))).shape == (2, 1, 8, 8)


def _psi(values: torch.Tensor) -> torch.Tensor:
    values = values.abs()
    flat = values.flatten(1)
    low = flat.min(1).values.view(-1, *([1] * (values.dim() - 1)))
    values = values - low
    high = values.flatten(1).max(1).values.view(-1, *([1] * (values.dim() - 1)))
    return values / (high + 1e-6)


def _reference_saliency(fullgrad: FullGrad, x: torch.Tensor, target: list[int]) -> torch.Tensor:
    """The formula of DESIGN.md, slowly: psi per layer, upsample every channel, then sum channels."""
    input_gradient, bias_gradients = fullgrad.fullGradientDecompose(x, target)
    spatial = x.shape[2:]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    total = _psi(input_gradient * x).sum(1, keepdim=True)
    for bias_gradient in bias_gradients:
        if bias_gradient.dim() != x.dim():
            continue
        scaled = _psi(bias_gradient)
        for channel in range(scaled.shape[1]):
            total = total + F.interpolate(
                scaled[:, channel : channel + 1], size=spatial, mode=mode, align_corners=True
            )
    return total


@pytest.mark.parametrize("kind", ["vgg", "resnet", "densenet"])
def test_saliency_equals_slow_per_channel_reference(kind: str) -> None:
    model = make_net(kind, dtype=torch.float32)
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    x = _inputs(torch.float32)
    saliency = fullgrad.saliency(x, TARGETS)
    assert saliency.shape == (4, 1, 16, 16) and saliency.min() >= 0
    torch.testing.assert_close(saliency, _reference_saliency(fullgrad, x, TARGETS), rtol=1e-5, atol=1e-5)
    assert fullgrad.last_relative_error is not None and fullgrad.last_relative_error.max() < 1e-5


def test_batch_targets_equal_single_sample_calls() -> None:
    model = make_net("resnet")
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    x = _inputs(torch.float64)
    batch = fullgrad.saliency(x, TARGETS)
    for i, target in enumerate(TARGETS):
        torch.testing.assert_close(batch[i : i + 1], fullgrad.saliency(x[i : i + 1], target))
    # None = arg-max per sample
    with torch.no_grad():
        argmax = model(x).argmax(1).tolist()
    torch.testing.assert_close(fullgrad.saliency(x), fullgrad.saliency(x, argmax))


def test_reference_names_and_aliases() -> None:
    model = make_net("vgg")
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    x = _inputs(torch.float64, n=2)
    assert fullgrad.checkCompleteness() == fullgrad.check_completeness()
    grad_a, biases_a = fullgrad.fullGradientDecompose(x, [1, 2])
    grad_b, biases_b = fullgrad.full_gradient_decompose(x, [1, 2])
    torch.testing.assert_close(grad_a, grad_b)
    assert len(biases_a) == len(biases_b) == 8  # 3 conv + 3 batchnorm + 2 linear
    torch.testing.assert_close(fullgrad.saliency(x, target_class=[1, 2]), fullgrad.saliency(x, [1, 2]))


def test_model_left_as_found() -> None:
    model = make_net("resnet", dtype=torch.float32).train()
    model.layer1.eval()
    model.fc.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    fullgrad.saliency(_inputs(torch.float32), TARGETS)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.fc.weight.requires_grad and model.fc.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert count_hooks(model) == 0
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.shape[0] > 2:
            raise RuntimeError("boom")
        return self.fc(x.mean((2, 3)))


def test_hooks_removed_when_forward_raises() -> None:
    model = Exploding()
    fullgrad = FullGrad(model, im_size=(3, 8, 8))
    with pytest.raises(RuntimeError, match="boom"):
        fullgrad.saliency(torch.randn(3, 3, 8, 8))
    assert count_hooks(model) == 0
    assert fullgrad.saliency(torch.randn(2, 3, 8, 8)).shape == (2, 1, 8, 8)


_LEAK_PROBE = """
import gc, warnings, torch
from bbdecoder.attribution import FullGrad
from tests.nets import make_net

def live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module proxies warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))

model = make_net("vgg", dtype=torch.float32)
fullgrad = FullGrad(model, im_size=(3, 16, 16))
x = torch.randn(4, 3, 16, 16)
for _ in range(3):
    fullgrad.saliency(x, [0, 1, 2, 3])
baseline = live_tensors()
for _ in range(20):
    fullgrad.saliency(x, [0, 1, 2, 3])
print(baseline, live_tensors())
"""


def test_repeated_calls_do_not_accumulate_memory() -> None:
    # A fresh interpreter: the heap scan stays fast and sees only this loop's objects.
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", _LEAK_PROBE], cwd=root, capture_output=True, text=True, timeout=120, check=True
    )
    baseline, after = map(int, result.stdout.split())
    assert after <= baseline


def test_missing_batch_dimension_and_bad_inputs() -> None:
    fullgrad = FullGrad(make_net("vgg", dtype=torch.float32), im_size=(3, 16, 16))
    with pytest.raises(ValueError, match="unsqueeze"):
        fullgrad.saliency(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        fullgrad.saliency(torch.zeros(1, 3, 16, 16, dtype=torch.long))


def test_completeness_checked_lazily_without_im_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with torch.no_grad():
        model[0].weight.mul_(30)
    fullgrad = FullGrad(model)  # nothing to check yet
    with pytest.raises(CompletenessError):
        fullgrad.saliency(torch.randn(2, 3, 8, 8))
    assert FullGrad(model, check=False).saliency(torch.randn(2, 3, 8, 8)).shape == (2, 1, 8, 8)


def test_input_transform_decomposes_the_model_input() -> None:
    model = make_net("vgg")
    normalize = Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.25])
    fullgrad = FullGrad(model, im_size=(3, 16, 16), input_transform=normalize)
    pixels = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    decomposition = fullgrad.decompose(pixels, [0, 1])
    assert decomposition.relative_error().max() < 1e-10
    torch.testing.assert_close(decomposition.inputs, normalize(pixels))


def test_smooth_fullgrad_is_the_mean_of_fullgrad_over_the_same_noisy_copies() -> None:
    model = make_net("resnet")
    smooth = SmoothFullGrad(model, im_size=(3, 16, 16), n_samples=4, noise_level=0.1, seed=3)
    x = _inputs(torch.float64, n=3)
    with torch.no_grad():
        clean_classes = model(x).argmax(1)
    fullgrad = FullGrad(model, im_size=(3, 16, 16))
    maps = [fullgrad.saliency(copy, clean_classes) for copy in smooth.noisy_copies(x)]
    expected = torch.stack(maps).mean(0)
    torch.testing.assert_close(smooth.saliency(x), expected, rtol=1e-10, atol=1e-10)
    assert count_hooks(model) == 0
