"""The monitor under FSDP2 (``fully_shard``): 2 CPU processes (gloo), each with half of every
(micro-)batch and a shard of every parameter, store the same statistics as one process on the
combined batch with the full parameters; only rank 0 writes; training is unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bbdecoder.integrations.ddp import DistributedAnalyzer, NullWriter
from bbdecoder.integrations.sharded import ShardSync, combine_partials, partial_sums
from bbdecoder.monitor import Analyzer
from bbdecoder.store import open_run
from tests.spawn import spawn_ranks

STEPS = 3
BATCH = 8
CONFIGS = {"reshard": (True, 1), "no_reshard_accumulate": (False, 2)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 7 rows split 4/3, 3 rows 2/1, and a 1-element bias: rank 1's shard of it is empty
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].bias[[1, 4]] = -100.0  # dead on every rank
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 5, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, 1, generator=gen).double(),
        )
        for _ in range(STEPS)
    ]


def _micro_batches(x: torch.Tensor, y: torch.Tensor, micro: int, rank: int | None, world: int) -> list:
    """The micro-batches of one step; with ``rank``, that rank's share of each."""
    out = []
    for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
        if rank is not None:
            xs, ys = xs.chunk(world)[rank], ys.chunk(world)[rank]
        out.append((xs, ys))
    return out


def _train(model: nn.Module, analyzer: Analyzer | None, micro: int, rank: int | None, world: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in _data():
        parts = _micro_batches(x, y, micro, rank, world)
        total = torch.zeros((), dtype=torch.float64)
        for k, (xs, ys) in enumerate(parts):
            if rank is not None:
                model.set_requires_gradient_sync(k == len(parts) - 1)  # type: ignore[operator]
            loss = F.mse_loss(model(xs), ys) / len(parts)
            loss.backward()
            total += loss.detach()
        if analyzer is not None:
            analyzer.step(loss=total)
        optimizer.step()
        optimizer.zero_grad()
    if analyzer is not None:
        analyzer.end_epoch()


def _sharded(reshard: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for i in (0, 2, 4):
        fully_shard(model[i], reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def _worker(rank: int, world: int, init_file: str, save_path: str, reshard: bool, micro: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, plain = _sharded(reshard), _sharded(reshard)
        analyzer = DistributedAnalyzer(model, save_path, activations=[1, 3])
        assert isinstance(analyzer.sync, ShardSync)
        assert isinstance(analyzer.writer, NullWriter) == (rank != 0)
        _train(model, analyzer, micro, rank, world)
        analyzer.close()
        _train(plain, None, micro, rank, world)
        for a, b in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a.to_local(), b.to_local())  # type: ignore[attr-defined]
        dist.barrier()  # no rank tears the group down while another still has work in flight
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    reshard, micro = CONFIGS[request.param]
    base = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    sharded_path, single_path = base / "fsdp_run", base / "single_run"
    spawn_ranks(_worker, (2, str(base / "init"), str(sharded_path), reshard, micro))
    model = _model()
    with Analyzer(model, single_path, activations=[1, 3]) as analyzer:
        _train(model, analyzer, micro, None, 2)
    return sharded_path, single_path


def _comparable(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return frame.sort_values(keys).reset_index(drop=True)


def test_fsdp_statistics_equal_single_process_on_combined_batch(runs: tuple[Path, Path]) -> None:
    sharded, single = (open_run(p) for p in runs)
    keys = ["step", "param", "layer_id", "stat"]
    # channel_var is a per-forward statistic of each rank's own batch (not mergeable, as under DDP)
    a, b = (_comparable(r.scalars().query("stat != 'channel_var'"), keys) for r in (sharded, single))
    assert len(a) == len(b) > STEPS * 6 * 6
    assert (a[keys].values == b[keys].values).all()
    names = {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert names <= set(a.param)
    grad_stats = {
        "mean",
        "mean_abs",
        "max_abs",
        "var",
        "l1",
        "l2",
        "update_ratio",
        "weight_q50",
        "dead_fraction",
    }
    assert grad_stats <= set(a.stat)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(sharded.steps().loss, single.steps().loss, rtol=1e-12)
    ekeys = ["epoch", "param", "layer_id", "stat", "agg"]
    ea, eb = _comparable(sharded.epoch_scalars(), ekeys), _comparable(single.epoch_scalars(), ekeys)
    assert len(ea) == len(eb) > 0
    np.testing.assert_allclose(ea.value, eb.value, rtol=1e-6, atol=1e-12)
    hkeys = ["step", "param", "bin"]
    ha, hb = _comparable(sharded.histograms(), hkeys), _comparable(single.histograms(), hkeys)
    assert len(ha) == len(hb) > 0 and (ha["count"].values == hb["count"].values).all()


def test_fsdp_only_rank_zero_writes(runs: tuple[Path, Path]) -> None:
    stores = sorted(p.name for p in runs[0].iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert stores == ["run.sqlite"], stores
    assert open_run(runs[0]).steps().step.tolist() == list(range(STEPS))


def test_partial_sums_combine_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(11, 3, generator=gen, dtype=torch.float64) * 5 + 1e3  # a large mean: no cancellation
    shards = [full[:6], full[6:], full[:0]]
    combined = combine_partials(torch.stack([partial_sums([s]) for s in shards]))[0]
    flat = full.reshape(-1)
    expected = [
        flat.mean(),
        flat.abs().mean(),
        flat.abs().max(),
        flat.var(correction=0),
        flat.abs().sum(),
        flat.norm(),
    ]
    torch.testing.assert_close(combined, torch.stack(expected), rtol=1e-12, atol=0)


def test_fsdp1_model_is_refused_with_the_way_out(tmp_path: Path) -> None:
    # FSDP1 cannot be built on CPU in torch 2.13 ("FSDP needs a non-CPU accelerator device"), so an
    # instance is made without its __init__: what is checked is the type, before any collective
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    model = nn.Sequential(wrapper, nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"FSDP1.*FlatParameter.*fully_shard"):
        DistributedAnalyzer(model, tmp_path / "run")
    assert not (tmp_path / "run").exists()
