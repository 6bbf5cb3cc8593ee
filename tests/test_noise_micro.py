"""The two-batch noise scale from the micro-batches of accumulated steps
(``Analyzer(micro_noise_scale=True)``) equals the estimator computed from each micro-batch's own
gradient (one ``autograd.grad`` per micro-batch, float64); it works with BatchNorm in train mode,
with ``every=``, under a GradScaler, and leaves training unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.monitor.noise_micro import MICRO_NOISE_STATS
from bbdecoder.monitor.noise_scale import NoiseEstimate, NoiseScaleEMA, from_parts
from bbdecoder.store import open_run

MICRO, SIZE, STEPS = 4, 4, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm in train mode: per-sample gradients are undefined, micro-batch gradients are not
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    n = MICRO * SIZE
    return [
        (torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,), generator=gen))
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, analyzer: Analyzer | None, scaler: object = None) -> list[list[float]]:
    """Train with MICRO accumulated micro-batches per step; returns the oracle's values per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    params = list(model.parameters())
    ema = NoiseScaleEMA(0.9)
    expected = []
    for x, y in _data():
        norms = []
        for xs, ys in zip(x.chunk(MICRO), y.chunk(MICRO), strict=True):
            loss = F.cross_entropy(model(xs), ys)
            # the oracle: this micro-batch's own gradient (the same forward, so the same BN statistics)
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            norms.append(float(sum(g.pow(2).sum() for g in grads)))
            scaled = loss / MICRO
            (scaler.scale(scaled) if scaler is not None else scaled).backward()  # type: ignore[attr-defined]
        union = float(sum(p.grad.pow(2).sum() for p in params))
        if scaler is not None:
            union /= float(scaler.get_scale()) ** 2  # type: ignore[attr-defined]
        est = from_parts(norms, SIZE, union)
        expected.append([est.trace, est.grad_sq, est.noise_scale, ema.update(est)])
        if analyzer is not None:
            analyzer.step()
        if scaler is not None:
            scaler.step(optimizer)  # type: ignore[attr-defined]
            scaler.update()  # type: ignore[attr-defined]
        else:
            optimizer.step()
        optimizer.zero_grad()
    return expected


def _stored(path: Path) -> np.ndarray:
    frame = open_run(path).scalars()
    frame = frame[frame.stat.isin(MICRO_NOISE_STATS)]
    return frame.pivot(index="step", columns="stat", values="value")[list(MICRO_NOISE_STATS)]


def test_stored_values_equal_the_micro_batch_oracle_and_training_is_unchanged(tmp_path: Path) -> None:
    model = _model()
    with Analyzer(model, tmp_path / "run", micro_noise_scale=True) as analyzer:
        expected = _train(model, analyzer)
    stored = _stored(tmp_path / "run")
    assert stored.index.tolist() == list(range(STEPS))
    np.testing.assert_allclose(stored.to_numpy(), np.array(expected), rtol=1e-10)
    assert (stored["noise_trace_micro"] > 0).all()
    plain = _model()
    _train(plain, None)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


def test_every_k_steps_and_a_single_micro_batch(tmp_path: Path) -> None:
    model = _model()
    with Analyzer(model, tmp_path / "every", micro_noise_scale=True, every=2) as analyzer:
        expected = _train(model, analyzer)
    stored = _stored(tmp_path / "every")
    assert stored.index.tolist() == [0, 2]  # steps 1 and 3 were not recorded and left nothing behind
    # the smoothed value follows the recorded steps only
    ema = NoiseScaleEMA(0.9)
    for step, row in zip((0, 2), stored.to_numpy(), strict=True):
        np.testing.assert_allclose(row[:3], expected[step][:3], rtol=1e-10)
        trace, grad_sq = expected[step][:2]
        assert row[3] == pytest.approx(ema.update(NoiseEstimate(trace, grad_sq)), rel=1e-10)
    single = _model()
    with Analyzer(single, tmp_path / "single", micro_noise_scale=True) as analyzer:
        x, y = _data()[0]
        F.cross_entropy(single(x), y).backward()
        analyzer.step()
    frame = open_run(tmp_path / "single").scalars()
    assert not frame.stat.isin(MICRO_NOISE_STATS).any()  # one micro-batch: nothing to estimate from


def test_unequal_micro_batches_give_nan(tmp_path: Path) -> None:
    model = _model()
    with Analyzer(model, tmp_path / "run", micro_noise_scale=True) as analyzer:
        x, y = _data()[0]
        for xs, ys in ((x[:6], y[:6]), (x[6:], y[6:])):
            (F.cross_entropy(model(xs), ys) / 2).backward()
        analyzer.step()
    row = _stored(tmp_path / "run").iloc[0]
    assert all(math.isnan(v) for v in row)


def test_grad_scaler_values_are_those_of_the_unscaled_gradients(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = _model().float()
    with Analyzer(model, tmp_path / "run", micro_noise_scale=True, scaler=scaler) as analyzer:
        scaled = _train_float(model, analyzer, scaler)
    reference = _model().float()
    with Analyzer(reference, tmp_path / "ref", micro_noise_scale=True) as analyzer:
        plain = _train_float(reference, analyzer, None)
    np.testing.assert_allclose(scaled, plain, rtol=1e-4)
    np.testing.assert_allclose(
        _stored(tmp_path / "run").to_numpy(), _stored(tmp_path / "ref").to_numpy(), rtol=1e-4
    )


def _train_float(model: nn.Module, analyzer: Analyzer, scaler: object) -> np.ndarray:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in _data()[:2]:
        for xs, ys in zip(x.float().chunk(MICRO), y.chunk(MICRO), strict=True):
            loss = F.cross_entropy(model(xs), ys) / MICRO
            (scaler.scale(loss) if scaler is not None else loss).backward()  # type: ignore[attr-defined]
        analyzer.step()
        if scaler is not None:
            scaler.step(optimizer)  # type: ignore[attr-defined]
            scaler.update()  # type: ignore[attr-defined]
        else:
            optimizer.step()
        optimizer.zero_grad()
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def test_refused_under_a_rank_sync(tmp_path: Path) -> None:
    class FakeSync:
        is_writer = True

        def open_writer(self, path: Path) -> object:
            from bbdecoder.store import RunWriter

            return RunWriter(path)

    with pytest.raises(ValueError, match="single-process"):
        Analyzer(nn.Linear(2, 2), tmp_path / "r", sync=FakeSync(), micro_noise_scale=True)
