"""Analyzer(per_sample=...) rows, and the gradient noise scale against closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.hooks import count_hooks
from bbdecoder.monitor import Analyzer
from bbdecoder.monitor.noise_scale import (
    NoiseEstimate,
    NoiseScaleEMA,
    from_parts,
    from_samples,
    from_two_batches,
)
from bbdecoder.monitor.per_sample import PerSampleError, capture
from bbdecoder.store import open_run


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(steps: int, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=gen),
        )
        for _ in range(steps)
    ]


def _train(model: nn.Module, path: Path | None, **kwargs: object) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    analyzer = Analyzer(model, path, **kwargs) if path is not None else None  # type: ignore[arg-type]
    for x, y in _batches(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if analyzer is not None:
            analyzer.step(loss=loss)
        optimizer.step()
    if analyzer is not None:
        analyzer.close()
    return [p.detach().clone() for p in model.parameters()]


def test_analyzer_stores_per_sample_rows_every_k_steps(tmp_path: Path) -> None:
    model = _mlp()
    reference = [p.detach().clone() for p in model.parameters()]
    hooks = count_hooks(model)
    final = _train(model, tmp_path / "run", per_sample=2)
    assert count_hooks(model) == hooks
    frame = open_run(tmp_path / "run").scalars()
    rows = frame[frame.stat.isin(["sample_norm_mean", "sample_var", "sample_grad_sq"])]
    assert sorted(set(rows.step)) == [0, 2, 4]
    assert set(rows.param) == {"0.weight", "0.bias", "2.weight", "2.bias", "*"}
    assert set(rows[rows.param == "*"].layer_id) == {-1}
    model_rows = frame[frame.param == "*"]
    assert set(model_rows.stat) == {
        "sample_norm_mean",
        "sample_var",
        "sample_grad_sq",
        "batch_size",
        "noise_trace",
        "noise_grad_sq",
        "noise_scale",
        "noise_scale_ema",
    }

    # the oracle: replay the same training with one backward per sample at the recorded steps
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference, strict=True):
            p.copy_(r)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for step, (x, y) in enumerate(_batches(5)):
        if step % 2 == 0:
            per = {n: [] for n, _ in model.named_parameters()}
            for i in range(len(x)):
                model.zero_grad()
                F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
                for n, p in model.named_parameters():
                    per[n].append(p.grad.flatten().clone())
            at = rows[rows.step == step].set_index(["param", "stat"]).value
            everything = []
            for n, gs in per.items():
                g = torch.stack(gs)
                everything.append(g)
                mean = g.mean(0)
                assert at[(n, "sample_norm_mean")] == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-9)
                assert at[(n, "sample_var")] == pytest.approx(
                    float((g - mean).pow(2).sum(1).mean()), rel=1e-9
                )
            g = torch.cat(everything, 1)
            assert at[("*", "sample_norm_mean")] == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-9)
            var, grad_sq, b = (
                float((g - g.mean(0)).pow(2).sum(1).mean()),
                float(g.mean(0).pow(2).sum()),
                len(x),
            )
            step_rows = model_rows[model_rows.step == step].set_index("stat").value
            expected = from_samples(var, grad_sq, b)
            assert step_rows["noise_scale"] == pytest.approx(expected.noise_scale, rel=1e-8)
            assert step_rows["noise_trace"] == pytest.approx(b / (b - 1) * var, rel=1e-9)
            assert step_rows["batch_size"] == b
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    # the monitor does not change training
    plain = _train(_mlp(), None)
    for a, b_, c in zip(final, plain, model.parameters(), strict=True):
        assert torch.equal(a, b_) and torch.equal(a, c.detach())


def test_analyzer_per_sample_refusals(tmp_path: Path) -> None:
    bn = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    with pytest.raises(PerSampleError, match="BatchNorm"):
        Analyzer(bn, tmp_path / "bn", per_sample=True)
    with pytest.raises(ValueError, match="per_sample must be"):
        Analyzer(nn.Linear(2, 2), tmp_path / "bad", per_sample=0.5)  # type: ignore[arg-type]


def test_estimators_algebra() -> None:
    est = from_two_batches(small_sq=3.0, b_small=2, big_sq=1.5, b_big=8)
    # E||G_B||^2 = |G|^2 + tr/B must hold at both sizes for the estimates
    assert est.grad_sq + est.trace / 2 == pytest.approx(3.0)
    assert est.grad_sq + est.trace / 8 == pytest.approx(1.5)
    assert from_parts([2.0, 4.0, 3.5, 2.5], 2, 1.5) == est  # 4 parts of 2: mean 3.0, union of 8
    s = from_samples(sample_var=0.75, grad_sq=1.0, batch_size=4)
    assert s == NoiseEstimate(1.0, 0.75)
    ema = NoiseScaleEMA(0.5)
    assert math.isnan(ema.value)
    assert ema.update(NoiseEstimate(2.0, 1.0)) == pytest.approx(2.0)  # bias-corrected from the first step
    assert ema.update(NoiseEstimate(math.nan, 1.0)) == pytest.approx(2.0)  # skipped
    assert ema.update(NoiseEstimate(4.0, 1.0)) == pytest.approx((0.5 * 2 * 0.5 + 0.5 * 4) / 0.75)
    for bad in (
        lambda: from_two_batches(1, 4, 1, 4),
        lambda: from_samples(1, 1, 1),
        lambda: from_parts([1], 2, 1),
    ):
        with pytest.raises(ValueError):
            bad()


def _micro_estimate(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, parts: int) -> NoiseEstimate:
    """The two-batch estimator of appendix A.1 on ``parts`` micro-batches of the batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(model(xs), ys), params)]))
    union = torch.stack(grads).mean(0)
    return from_parts([float(g.pow(2).sum()) for g in grads], len(x) // parts, float(union.pow(2).sum()))


def _per_sample_estimate(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> NoiseEstimate:
    with capture(model) as ps:
        loss_fn(model(x), y).backward()
        stats = ps.compute()
    model.zero_grad()
    _, var, grad_sq = stats.model_row().tolist()
    return from_samples(var, grad_sq, len(x))


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(len(arr)))


def test_noise_scale_converges_on_linear_regression() -> None:
    """y = x.w* + e, x ~ N(0, I_d), e ~ N(0, s^2), loss (x.w - y)^2 / 2 at w = w* + delta:
    g = (x.delta - e) x, so G = delta, tr(Sigma) = (d + 1)|delta|^2 + d s^2 (Gaussian fourth moments)."""
    d, s, batch, steps = 5, 0.5, 16, 300
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_((w_star + delta).unsqueeze(0))
    trace_true = (d + 1) * float(delta.pow(2).sum()) + d * s * s
    grad_sq_true = float(delta.pow(2).sum())

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.squeeze(1) - y).pow(2).mean()

    per_sample, micro = [], []
    ema = NoiseScaleEMA(0.99)
    for _ in range(steps):
        x = torch.randn(batch, d, generator=gen, dtype=torch.float64)
        y = x @ w_star + s * torch.randn(batch, generator=gen, dtype=torch.float64)
        est = _per_sample_estimate(model, loss_fn, x, y)
        ema.update(est)
        per_sample.append(est)
        micro.append(_micro_estimate(model, loss_fn, x, y, parts=4))
    for estimates in (per_sample, micro):
        for field, truth in (("trace", trace_true), ("grad_sq", grad_sq_true)):
            mean, se = _mean_and_se([getattr(e, field) for e in estimates])
            assert abs(mean - truth) < 4 * se and abs(mean - truth) < 0.15 * truth, (field, mean, truth, se)
    b_true = trace_true / grad_sq_true
    assert ema.value == pytest.approx(b_true, rel=0.3)
    pooled = NoiseEstimate(
        float(np.mean([e.trace for e in per_sample])), float(np.mean([e.grad_sq for e in per_sample]))
    )
    assert pooled.noise_scale == pytest.approx(b_true, rel=0.1)


def test_both_estimators_agree_on_a_small_cnn() -> None:
    """Over many batches at fixed weights, the per-sample and the micro-batch estimates of tr(Sigma)
    and |G|^2 have the same mean: within 4 standard errors of their difference, and 15%."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()
    with torch.no_grad():
        model[-1].bias.copy_(torch.tensor([2.0, 0.0, -2.0]))  # a consistent error: |G|^2 well above noise
    teacher = nn.Linear(64, 3).double()
    gen = torch.Generator().manual_seed(1)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    diffs: dict[str, list[float]] = {"trace": [], "grad_sq": []}
    means: dict[str, list[float]] = {"trace": [], "grad_sq": []}
    for _ in range(150):
        x = torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            y = teacher(x.flatten(1)).argmax(1)
        a = _per_sample_estimate(model, loss_fn, x, y)
        b = _micro_estimate(model, loss_fn, x, y, parts=4)
        for field in diffs:
            diffs[field].append(getattr(a, field) - getattr(b, field))
            means[field].append(getattr(a, field))
    for field in diffs:
        diff, se = _mean_and_se(diffs[field])
        level = float(np.mean(means[field]))
        assert abs(diff) < 4 * se and abs(diff) < 0.15 * abs(level), (field, diff, se, level)


def test_noise_figures_from_the_store(tmp_path: Path) -> None:
    from bbdecoder.viz.noise_plots import gradient_snr, plot_gradient_snr, plot_noise_scale

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(3)
    with Analyzer(model, tmp_path / "run", per_sample=True) as analyzer:
        for step in range(12):
            batch = 8 if step < 6 else 32  # the batch size in use changes mid-run
            x = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
            y = (x[:, 0] > 0).long()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            analyzer.step(loss=loss)
            optimizer.step()
    snr = gradient_snr(tmp_path / "run")
    assert len(snr) == 12 * 5 and set(snr.param) == {"0.weight", "0.bias", "2.weight", "2.bias", "*"}
    frame = open_run(tmp_path / "run").scalars()
    at = frame[(frame.step == 7) & (frame.param == "2.weight")].set_index("stat").value
    trace = 32 / 31 * at["sample_var"]
    assert snr[(snr.step == 7) & (snr.param == "2.weight")].snr.item() == pytest.approx(
        at["sample_grad_sq"] / (trace / 32)
    )
    sizes = frame[frame.stat == "batch_size"].sort_values("step").value.tolist()
    assert sizes == [8.0] * 6 + [32.0] * 6
    for path in (
        plot_gradient_snr(tmp_path / "run", tmp_path / "fig"),
        plot_noise_scale(tmp_path / "run", tmp_path / "fig"),
    ):
        assert path.exists() and path.stat().st_size > 10_000
    with Analyzer(nn.Linear(2, 2), tmp_path / "plain") as plain:
        plain.model(torch.randn(3, 2)).sum().backward()
        plain.step()
    with pytest.raises(ValueError, match="per_sample=True"):
        plot_noise_scale(tmp_path / "plain", tmp_path / "fig")
