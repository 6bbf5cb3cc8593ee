"""The monitor under DistributedDataParallel: 2 CPU processes (gloo), each with half of the batch,
store the same statistics as one process on the combined batch, and only rank 0 writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bbdecoder.integrations.ddp import DistributedAnalyzer, NullWriter, RankSync, unwrap_model
from bbdecoder.monitor import Analyzer
from bbdecoder.store import open_run
from tests.spawn import DEADLINE, spawn_ranks

STEPS = 3
BATCH = 8
STORE_HOST = "127.0.0.1"


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.Sigmoid()).double()
    with torch.no_grad():
        model[0].bias[[1, 4]] = -100.0  # two units that never fire: dead on every rank
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
            torch.rand(BATCH, 3, generator=gen).double(),
        )
        for _ in range(STEPS)
    ]


def _train(analyzer: Analyzer, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        loss = F.mse_loss(analyzer.forward_propagation(x), y)
        optimizer.zero_grad()
        analyzer.backward_propagation(loss)
        optimizer.step()
    analyzer.end_epoch()


def _worker(rank: int, world: int, store_port: int, save_path: str) -> None:
    torch.set_num_threads(1)
    # The parent holds the store (listening on a port the OS gave it), so there is no port to race
    # for and no shared init file whose last user deletes it.
    store = dist.TCPStore(STORE_HOST, store_port, is_master=False, timeout=DEADLINE)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=DEADLINE)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
        half = BATCH // world
        shard = [(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]) for x, y in _data()]
        analyzer = DistributedAnalyzer(ddp, save_path, activations=[1, 3])
        assert analyzer.is_writer == (rank == 0)
        assert isinstance(analyzer.writer, NullWriter) == (rank != 0)
        _train(analyzer, optimizer, shard)
        analyzer.close()
        assert analyzer.index.names == ["0", "1", "2", "3"]  # no "module." prefix
        # Leave together: a rank that closes its gloo connections while the other still has a
        # message in flight makes gloo throw on its I/O thread, i.e. abort (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(
    world: int, save_path: Path, worker: Callable[[int, int, int, str], None] | None = None
) -> None:
    """Spawn ``world`` ranks of ``worker(rank, world, store_port, save_path)`` (default :func:`_worker`)
    with one thread each (:func:`tests.spawn.spawn_ranks`: a deadline, each rank's stderr in the
    failure)."""
    store = dist.TCPStore(STORE_HOST, 0, is_master=True, wait_for_workers=False, timeout=DEADLINE)
    spawn_ranks(worker or _worker, (world, store.port, str(save_path)), world)
    del store


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["step", "param", "layer_id", "stat"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ddp")
    ddp_path, single_path = base / "ddp_run", base / "single_run"
    run_ranks(2, ddp_path)
    model = _model()
    with Analyzer(model, single_path, activations=[1, 3]) as analyzer:
        _train(analyzer, torch.optim.SGD(model.parameters(), lr=0.5), _data())
    return ddp_path, single_path


def test_ddp_gradient_statistics_equal_single_process_on_combined_batch(runs: tuple[Path, Path]) -> None:
    ddp, single = (open_run(p).scalars() for p in runs)
    stats = ["mean", "mean_abs", "max_abs", "var", "l1", "l2", "update_ratio"]
    a = _comparable(ddp[ddp.stat.isin(stats)])
    b = _comparable(single[single.stat.isin(stats)])
    assert len(a) == STEPS * 4 * 7 and len(a) == len(b)
    assert (
        a[["step", "layer", "param", "stat"]].values == b[["step", "layer", "param", "stat"]].values
    ).all()
    assert set(a.param) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    np.testing.assert_allclose(a.value, b.value, rtol=1e-6, atol=1e-12)
    # the loss is the mean of the ranks' half-batch losses = the combined batch's mean loss
    np.testing.assert_allclose(open_run(runs[0]).steps().loss, open_run(runs[1]).steps().loss, rtol=1e-12)


def test_ddp_activation_statistics_merge_across_ranks(runs: tuple[Path, Path]) -> None:
    ddp, single = (open_run(p).scalars() for p in runs)
    for stat in ("dead_fraction", "dead_count", "saturated_fraction"):
        a, b = _comparable(ddp[ddp.stat == stat]), _comparable(single[single.stat == stat])
        assert len(a) == 2 and len(b) == 2
        np.testing.assert_allclose(a.value, b.value, rtol=1e-12)
    dead = ddp[(ddp.stat == "dead_count") & (ddp.layer == "1")].value
    assert dead.tolist() == [2.0]


def test_only_rank_zero_writes(runs: tuple[Path, Path]) -> None:
    ddp_path = runs[0]
    stores = sorted(p.name for p in ddp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert stores == ["run.sqlite"], stores  # one store file; rank 1 created nothing
    assert open_run(ddp_path).steps().step.tolist() == list(range(STEPS))


def test_rank_sync_needs_a_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        RankSync()
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedAnalyzer(nn.Linear(2, 2), "unused")


def test_unwrap_model_and_null_writer(tmp_path: Path) -> None:
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(inner) is inner
    writer = NullWriter(tmp_path / "nothing")
    assert writer.series_id(0, "w") == writer.series_id(0, "w") != writer.series_id(1, "w")
    writer.add_scalars([(0, 0, 1, 1, 1.0)])
    writer.flush()
    writer.close()
    assert not (tmp_path / "nothing").exists()
