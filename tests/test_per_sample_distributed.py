"""Per-sample statistics over the global batch: 2 spawned CPU ranks (gloo), under DDP and under
FSDP2 (``fully_shard``), each with half of every micro-batch and gradient accumulation (2
micro-batches per step), store the same per-sample rows as one process on the combined batch;
training is bit-identical with and without the per-sample hooks."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bbdecoder.integrations.ddp import DistributedAnalyzer
from bbdecoder.monitor import Analyzer
from bbdecoder.monitor.per_sample import PerSampleError, PerSampleStats
from bbdecoder.monitor.per_sample_recorder import NOISE_STATS, PER_SAMPLE_STATS
from bbdecoder.store import open_run
from tests.spawn import DEADLINE, spawn_ranks

STEPS = 3
BATCH = 8
MICRO = 2
KINDS = ("ddp", "fsdp")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, stride=2),  # length 5 -> 3
        nn.Tanh(),
        nn.Flatten(),
        nn.LayerNorm(12),  # the torch.func fallback (under FSDP2: on the gathered parameters)
        nn.Linear(12, 3),
        nn.Tanh(),
        nn.Linear(3, 1),
    ).double()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 2, 5, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=gen).double(),
        )
        for _ in range(STEPS)
    ]


def _train(model: nn.Module, analyzer: Analyzer | None, kind: str | None, rank: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    for x, y in _data():
        parts = list(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True))
        for k, (xs, ys) in enumerate(parts):
            last = k == len(parts) - 1
            if kind is not None:
                xs, ys = xs.chunk(2)[rank], ys.chunk(2)[rank]
            if kind == "fsdp":
                model.set_requires_gradient_sync(last)  # type: ignore[operator]
            context = model.no_sync() if kind == "ddp" and not last else nullcontext()  # type: ignore[operator]
            with context:
                (F.mse_loss(model(xs), ys) / len(parts)).backward()
        if analyzer is not None:
            analyzer.step()
        optimizer.step()
        optimizer.zero_grad()


def _wrapped(kind: str) -> nn.Module:
    model = _model()
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for i in (0, 4, 6):
        fully_shard(model[i])
    fully_shard(model)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _worker(rank: int, world: int, init_file: str, base: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=DEADLINE
    )
    try:
        for kind in KINDS:
            model = _wrapped(kind)
            analyzer = DistributedAnalyzer(model, Path(base) / kind, per_sample=True, weights=False)
            _train(model, analyzer, kind, rank)
            analyzer.close()
            plain = _wrapped(kind)
            _train(plain, None, kind, rank)
            for a, b in zip(model.parameters(), plain.parameters(), strict=True):  # training unchanged
                assert torch.equal(_local(a), _local(b))
        # a rank that covers other tensors than its peer is refused on every rank (no hang, no garbage)
        from bbdecoder.monitor.per_sample_merge import merge_across_ranks

        n = 1 + rank
        stats = PerSampleStats(
            ["w"] * n, torch.zeros(n, 3), torch.ones(2), {}, torch.zeros(n, 2), [torch.zeros(2)] * n
        )
        try:
            merge_across_ranks(stats)
        except PerSampleError as err:
            assert "different parameter tensors" in str(err)
        else:
            raise AssertionError("a mismatch across ranks was not refused")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("per_sample_dist")
    spawn_ranks(_worker, (2, str(base / "init"), str(base)))
    model = _model()
    with Analyzer(model, base / "single", per_sample=True, weights=False) as analyzer:
        _train(model, analyzer, None, 0)
    return base


def _rows(path: Path) -> pd.DataFrame:
    frame = open_run(path).scalars()
    frame = frame[frame.stat.isin(PER_SAMPLE_STATS + NOISE_STATS)]
    return frame.sort_values(["step", "param", "stat"]).reset_index(drop=True)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_rows_equal_one_process_on_the_combined_batch(runs: Path, kind: str) -> None:
    got, want = _rows(runs / kind), _rows(runs / "single")
    params = {"0.weight", "0.bias", "3.weight", "3.bias", "4.weight", "4.bias", "6.weight", "6.bias", "*"}
    assert set(want.param) == params
    assert len(got) == len(want) == STEPS * (len(params) * 3 + len(NOISE_STATS))
    keys = ["step", "param", "stat"]
    assert (got[keys].values == want[keys].values).all()
    np.testing.assert_allclose(got.value, want.value, rtol=1e-9, atol=1e-15)
    assert (want[want.stat == "batch_size"].value == BATCH).all()  # the global batch, not a rank's


def test_only_rank_zero_wrote(runs: Path) -> None:
    for kind in KINDS:
        assert sorted(p.name for p in (runs / kind).iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
            "run.sqlite"
        ]
