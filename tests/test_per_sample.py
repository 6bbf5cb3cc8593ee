"""Per-sample gradient statistics equal a loop of one backward per sample (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.hooks import count_hooks
from bbdecoder.monitor.per_sample import PerSampleError, PerSampleGradients, capture
from bbdecoder.monitor.per_sample_rules import Factored


@pytest.fixture(autouse=True)
def _float64() -> object:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


PerSampleLoss = Callable[[torch.Tensor], torch.Tensor]


def _ce(out: torch.Tensor) -> torch.Tensor:
    """Per-sample losses of any output: cross-entropy over the last dim against class ``l % C`` at
    position ``l`` (the same for every sample, so a sample alone gets the same loss)."""
    flat = out.reshape(out.shape[0], -1, out.shape[-1])
    target = (torch.arange(flat.shape[1]) % flat.shape[-1]).expand(flat.shape[0], -1)
    return F.cross_entropy(flat.transpose(1, 2), target, reduction="none").mean(1)


def _oracle(model: nn.Module, x: torch.Tensor, per_sample: PerSampleLoss) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}`` per-sample gradients by one backward per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(x.shape[0]):
        model.zero_grad()
        per_sample(model(x[i : i + 1])).sum().backward()
        for n, p in params.items():
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad()
    return {n: torch.stack(g) for n, g in grads.items()}


def _expected(per: dict[str, torch.Tensor]) -> dict[str, tuple[float, float, float]]:
    out = {}
    for n, g in per.items():
        flat = g.flatten(1)
        mean = flat.mean(0)
        out[n] = (
            float(flat.norm(dim=1).mean()),
            float((flat - mean).pow(2).sum(1).mean()),
            float(mean.pow(2).sum()),
        )
    return out


def _check(model: nn.Module, x: torch.Tensor, per_sample: PerSampleLoss = _ce, **kwargs: object) -> None:
    model = model.double()
    expected = _expected(_oracle(model, x, per_sample))
    before = count_hooks(model)
    with capture(model, **kwargs) as ps:  # type: ignore[arg-type]
        per_sample(model(x)).mean().backward()
        stats = ps.compute()
    assert count_hooks(model) == before
    assert sorted(stats.names) == sorted(expected)
    assert stats.batch_size == x.shape[0]
    for name, row in zip(stats.names, stats.table.tolist(), strict=True):
        assert row == pytest.approx(expected[name], rel=1e-9, abs=1e-13), name
    # whole model: ||g_i||^2 summed over tensors
    everything = torch.cat([g.flatten(1) for g in _oracle(model, x, per_sample).values()], 1)
    torch.testing.assert_close(stats.sample_sq_norms, everything.pow(2).sum(1), rtol=1e-9, atol=1e-14)


def test_linear() -> None:
    torch.manual_seed(0)
    _check(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(6, 5, dtype=torch.float64))


def _no_materialising(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Factored) -> torch.Tensor:
        raise AssertionError("per-sample weight gradients were materialised")

    monkeypatch.setattr(Factored, "dense", refuse)


@pytest.mark.parametrize("length", [3, 40])
def test_linear_on_token_inputs(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 20))
    if length == 3:  # L (a + b) < a b: the Gram-matrix path, g_i never formed
        _no_materialising(monkeypatch)
    _check(model, torch.randn(5, length, 16, dtype=torch.float64))


def test_conv1d_stride_padding_dilation() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding="same", padding_mode="circular", groups=2),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(5, 3, 11, dtype=torch.float64)
    model.double()(x)  # materialise the lazy layer
    _check(model, x)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), groups=2),
        dict(kernel_size=3, padding="same", padding_mode="reflect", dilation=2, groups=4, bias=False),
        pytest.param(
            dict(kernel_size=4, padding="same"),  # even kernel: asymmetric padding
            marks=pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel"),
        ),
    ],
)
def test_conv2d(conv: dict) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(4, 8, **conv), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3)
    )
    _check(model, torch.randn(4, 4, 9, 9, dtype=torch.float64))


def test_conv2d_gram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many channels over few positions: the Gram-matrix path (g_i never formed)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, groups=2), nn.Flatten(), nn.Linear(16 * 4, 20))
    _no_materialising(monkeypatch)
    _check(model, torch.randn(3, 8, 4, 4, dtype=torch.float64))


class _Bag(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)))


def test_embedding_and_layernorm_fallback() -> None:
    torch.manual_seed(5)
    ids = torch.tensor([[1, 2, 2, 0], [3, 3, 3, 3], [0, 0, 5, 10], [7, 1, 2, 9]])
    _check(_Bag(), ids)


def test_tied_embedding_and_head() -> None:
    torch.manual_seed(6)
    ids = torch.tensor([[1, 2, 2, 0], [3, 4, 3, 3], [0, 6, 5, 10]])
    model = _Bag(tied=True)
    _check(model, ids)


class _Shared(nn.Module):
    """One Linear applied twice, and a parameter on the root (ViT's cls_token pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.token.expand(x.shape[0], 1, 4), x], 1)
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(h)))).mean(1))


def test_shared_module_and_root_parameter() -> None:
    torch.manual_seed(7)
    _check(_Shared(), torch.randn(5, 3, 4, dtype=torch.float64))


def test_sum_reduction() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = _expected(_oracle(model, x, _ce))
    with capture(model, loss_reduction="sum") as ps:
        _ce(model(x)).sum().backward()
        stats = ps.compute()
    for name, row in zip(stats.names, stats.table.tolist(), strict=True):
        assert row == pytest.approx(expected[name], rel=1e-9), name


def test_gradient_accumulation_counts_every_micro_batch() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    expected = _expected(_oracle(model, x, _ce))
    with capture(model) as ps:
        for part in x.split(2):
            (_ce(model(part)).mean() / 3).backward()  # accumulated mean over the 6 samples
        stats = ps.compute()
    assert stats.batch_size == 6
    for name, row in zip(stats.names, stats.table.tolist(), strict=True):
        assert row == pytest.approx(expected[name], rel=1e-9), name


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(PerSampleError, match=r"BatchNorm in training mode \(1\).*eval"):
        PerSampleGradients(model)
    model[1].eval()  # running statistics: each sample on its own again
    torch.manual_seed(10)
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    model.double()(x)
    _check(model, x)
    ps = PerSampleGradients(model)
    model[1].train()
    with pytest.raises(PerSampleError, match="BatchNorm"):
        ps.arm()
    ps.close()


def test_random_layer_is_left_out_with_a_warning() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x * self.scale, 0.5, training=True)

    model = nn.Sequential(nn.Linear(2, 3), Noisy(), nn.Linear(3, 2)).double()
    with capture(model) as ps:
        _ce(model(torch.randn(4, 2, dtype=torch.float64))).mean().backward()
        with pytest.warns(RuntimeWarning, match=r"Noisy\.scale.*random"):
            stats = ps.compute()
    assert stats.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "Noisy.scale" in stats.skipped


def test_nothing_captured_is_an_error() -> None:
    model = nn.Linear(2, 2)
    with capture(model) as ps, pytest.raises(PerSampleError, match="no per-sample data"):
        ps.compute()


@pytest.mark.slow  # torch.compile takes ~25 s on a loaded 2-core machine
def test_compiled_model_gives_the_eager_numbers() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with capture(model) as ps:
        _ce(model(x)).mean().backward()
        eager = ps.compute()
    model.zero_grad()
    compiled = torch.compile(model)
    with capture(model) as ps:
        _ce(compiled(x)).mean().backward()
        got = ps.compute()
    assert got.names == eager.names
    torch.testing.assert_close(got.table, eager.table, rtol=1e-10, atol=1e-14)
