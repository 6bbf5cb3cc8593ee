"""The FSDP2 monitor with a mixed-precision policy (2 CPU ranks, gloo): the stored gradient
statistics are those of the reduced gradient as FSDP2 stores it on the sharded parameter (in the
sharded parameter's dtype, here float64, after a bfloat16 forward and a float32 reduce-scatter);
the oracle gathers that gradient (``full_tensor``) at every step. Training is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bbdecoder.integrations.ddp import DistributedAnalyzer
from bbdecoder.monitor.grad_stats import GRAD_STATS
from bbdecoder.store import open_run
from tests.spawn import DEADLINE, spawn_ranks

STEPS = 2


def _sharded() -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1)).double()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i in (0, 2):
        fully_shard(model[i], mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _train(model: nn.Module, analyzer: DistributedAnalyzer | None, rank: int) -> list[dict[str, list[float]]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    oracle = []
    for _ in range(STEPS):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64).chunk(2)[rank]
        F.mse_loss(model(x).double(), x.sum(1, keepdim=True)).backward()
        if analyzer is not None:
            step = {}
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.dtype == torch.float64  # the sharded parameter's dtype
                g = p.grad.full_tensor().reshape(-1)  # type: ignore[attr-defined]
                step[name] = [
                    float(v)
                    for v in (
                        g.mean(),
                        g.abs().mean(),
                        g.abs().max(),
                        g.var(correction=0),
                        g.abs().sum(),
                        g.norm(),
                    )
                ]
            oracle.append(step)
            analyzer.step()
        optimizer.step()
        optimizer.zero_grad()
    return oracle


def _worker(rank: int, world: int, init_file: str, save_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=DEADLINE
    )
    try:
        model, plain = _sharded(), _sharded()
        analyzer = DistributedAnalyzer(model, save_path, weights=False)
        oracle = _train(model, analyzer, rank)
        analyzer.close()
        _train(plain, None, rank)
        for a, b in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a.to_local(), b.to_local())  # type: ignore[attr-defined]
        if rank == 0:
            torch.save(oracle, Path(save_path) / "oracle.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fsdp_mixed")
    spawn_ranks(_worker, (2, str(base / "init"), str(base / "run")))
    return base / "run"


def test_mixed_precision_statistics_are_of_the_stored_reduced_gradient(run: Path) -> None:
    oracle = torch.load(run / "oracle.pt")
    frame = open_run(run).scalars()
    frame = frame[frame.stat.isin(GRAD_STATS)]
    assert len(frame) == STEPS * 4 * len(GRAD_STATS)
    for row in frame.itertuples():
        want = oracle[row.step][row.param][GRAD_STATS.index(row.stat)]
        assert row.value == pytest.approx(want, rel=1e-12, abs=1e-15), (row.step, row.param, row.stat)
    assert np.isfinite(frame.value).all()
