"""BBDecoderCallback under Lightning's FSDP2 path (``ModelParallelStrategy``, ``fully_shard`` in
``configure_model``): 2 CPU ranks (gloo) store the same statistics as one process on the combined
batches; Lightning's FSDP1 ``FSDPStrategy`` is refused with the reason."""

from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from bbdecoder.integrations.lightning import BBDecoderCallback  # noqa: E402
from bbdecoder.store import open_run  # noqa: E402
from tests.spawn import spawn_ranks  # noqa: E402

COMMON = {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "logger": False,
          "enable_checkpointing": False, "enable_model_summary": False}  # fmt: skip


class ShardedModule(pl.LightningModule):
    """A small float64 net, sharded with ``fully_shard`` per Linear and at the root when Lightning
    gives it a device mesh; writes each step's dataset indices to ``record_dir``."""

    def __init__(self, record_dir: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)
        ).double()
        self.record_dir = record_dir

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for i in (0, 2, 4):
            fully_shard(self.net[i], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], idx: int) -> torch.Tensor:
        x, y, indices = batch
        if self.record_dir is not None:
            torch.save(indices, Path(self.record_dir) / f"rank{self.global_rank}_step{idx}.pt")
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _dataset() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) * 2.0, torch.arange(len(x)))


def _worker(rank: int, port: int, save: str, shards: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    # the processes exist already: Lightning's environment joins them instead of launching its own
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
         "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
    )  # fmt: skip
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(devices=2, strategy=strategy, callbacks=[BBDecoderCallback(save)], **COMMON)
    module = ShardedModule(shards)
    trainer.fit(module, torch.utils.data.DataLoader(_dataset(), batch_size=4))
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in module.parameters())  # really sharded by fully_shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_model_parallel_fsdp2_equals_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    sharded_dir, single_dir, shards = tmp_path / "fsdp2", tmp_path / "single", tmp_path / "shards"
    shards.mkdir()
    spawn_ranks(_worker, (_free_port(), str(sharded_dir), str(shards)))
    steps = len(list(shards.glob("rank0_*")))
    combined = [
        torch.cat([torch.load(shards / f"rank{r}_step{k}.pt") for r in (0, 1)]).tolist() for k in range(steps)
    ]
    pl.Trainer(devices=1, callbacks=[BBDecoderCallback(single_dir)], **COMMON).fit(
        ShardedModule(), torch.utils.data.DataLoader(_dataset(), batch_sampler=combined)
    )
    assert [p.name for p in sharded_dir.glob("*.sqlite")] == ["run.sqlite"]  # rank 0 wrote, alone
    key = ["step", "param", "stat"]
    a = open_run(sharded_dir).scalars().sort_values(key).reset_index(drop=True)
    b = open_run(single_dir).scalars().sort_values(key).reset_index(drop=True)
    assert steps == 3 and len(a) == len(b) > 0 and a["step"].max() == steps - 1
    assert {"net.0.weight", "net.4.bias"} <= set(a.param)  # the LightningModule's state_dict names
    assert {"l2", "var", "update_ratio", "weight_q50"} <= set(a.stat)
    pd.testing.assert_frame_equal(a[key], b[key])
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        open_run(sharded_dir).steps().loss, open_run(single_dir).steps().loss, rtol=1e-9
    )


def test_fsdp1_strategy_is_refused_with_the_way_out(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    callback = BBDecoderCallback(tmp_path / "run")
    trainer = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(TypeError, match=r"FSDPStrategy.*ModelParallelStrategy.*fully_shard"):
        callback.setup(trainer, ShardedModule(), "fit")
    assert callback.analyzer is None and not (tmp_path / "run").exists()
