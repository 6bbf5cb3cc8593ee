"""The two-batch gradient noise scale across 2 DDP ranks (gloo) equals the estimator computed in
one process from the two half-batch gradients, and training is unchanged by the comm hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bbdecoder.integrations.ddp import DistributedAnalyzer
from bbdecoder.monitor.noise_scale import NoiseScaleEMA, from_parts
from bbdecoder.store import open_run
from tests.spawn import spawn_ranks

STEPS = 4
BATCH = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, 2, generator=gen).double(),
        )
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, analyzer: DistributedAnalyzer | None, rank: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in _data():
        xs, ys = x.chunk(2)[rank], y.chunk(2)[rank]
        optimizer.zero_grad()
        F.mse_loss(model(xs), ys).backward()
        if analyzer is not None:
            analyzer.step()
        optimizer.step()


def _worker(rank: int, world: int, init_file: str, save_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        plain = nn.parallel.DistributedDataParallel(_model())
        analyzer = DistributedAnalyzer(ddp, save_path, noise_scale=True)
        _train(ddp, analyzer, rank)
        analyzer.close()
        _train(plain, None, rank)
        for a, b in zip(ddp.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a, b)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ddp_noise")
    spawn_ranks(_worker, (2, str(base / "init"), str(base / "run")))
    return base / "run"


def test_rank_noise_scale_equals_the_two_half_batch_estimate(run: Path) -> None:
    frame = open_run(run).scalars()
    stored = frame[frame.param == "*"].pivot(index="step", columns="stat", values="value")
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    ema = NoiseScaleEMA(0.9)
    expected = []
    for x, y in _data():
        halves = []
        for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
            grads = torch.autograd.grad(F.mse_loss(model(xs), ys), list(model.parameters()))
            halves.append(torch.cat([g.flatten() for g in grads]))
        mean = (halves[0] + halves[1]) / 2
        est = from_parts([float(h.pow(2).sum()) for h in halves], BATCH // 2, float(mean.pow(2).sum()))
        expected.append([est.trace, est.grad_sq, est.noise_scale, ema.update(est)])
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    got = stored[["noise_trace_ranks", "noise_grad_sq_ranks", "noise_scale_ranks", "noise_scale_ranks_ema"]]
    assert len(got) == STEPS
    np.testing.assert_allclose(got.values, np.array(expected), rtol=1e-6)
