"""BBDecoderCallback with Lightning's own Trainer on CPU: what is stored equals the gradients the
clipping saw (after unscaling, before clipping), and the module ends exactly as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from bbdecoder.hooks import count_hooks  # noqa: E402
from bbdecoder.integrations.lightning import BBDecoderCallback  # noqa: E402
from bbdecoder.store import open_run  # noqa: E402

CLIP = 0.05


class TinyModule(pl.LightningModule):
    """Records, at the clipping point, the per-parameter gradient norms before and after clipping."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.before_clip: list[dict[str, float]] = []
        self.after_clip: list[dict[str, float]] = []
        self.micro_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.micro_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _norms(self) -> dict[str, float]:
        return {n: float(p.grad.double().norm()) for n, p in self.named_parameters() if p.grad is not None}

    def configure_gradient_clipping(
        self, optimizer: object, gradient_clip_val: object = None, gradient_clip_algorithm: object = None
    ) -> None:
        self.before_clip.append(self._norms())
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]
        self.after_clip.append(self._norms())


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) * 3.0
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(module: TinyModule, callbacks: list, accumulate: int = 1) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        gradient_clip_val=CLIP,
        accumulate_grad_batches=accumulate,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, _loader())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_stored_norms_are_the_unclipped_gradients(tmp_path: Path, accumulate: int) -> None:
    module = TinyModule()
    keys = list(module.state_dict())
    _fit(module, [BBDecoderCallback(tmp_path, activations=["net.1"])], accumulate)
    optimizer_steps = 2 * 4 // accumulate
    assert len(module.before_clip) == optimizer_steps

    run = open_run(tmp_path)
    l2 = run.scalars("l2").pivot(index="step", columns="param", values="value")
    assert list(l2.index) == list(range(optimizer_steps))
    assert sorted(l2.columns) == sorted(n for n in keys)  # state_dict names of the LightningModule
    for step, (before, after) in enumerate(zip(module.before_clip, module.after_clip, strict=True)):
        for name, norm in before.items():
            assert l2.loc[step, name] == pytest.approx(norm, rel=1e-6)
        total_before = np.sqrt(sum(v * v for v in before.values()))
        total_after = np.sqrt(sum(v * v for v in after.values()))
        assert total_before > 2 * CLIP and total_after == pytest.approx(CLIP, rel=1e-4)  # clipping acted

    losses = np.array(module.micro_losses).reshape(optimizer_steps, accumulate).mean(axis=1)
    np.testing.assert_allclose(run.steps().loss, losses, rtol=1e-6)
    assert run.epochs() == [0, 1]
    assert set(run.epoch_scalars().epoch) == {0, 1}
    assert set(run.histograms().epoch) == {0, 1}
    assert len(run.scalars("dead_fraction")) == 2

    # the module is untouched: no hooks left, same state_dict keys
    assert count_hooks(module) == 0
    assert list(module.state_dict()) == keys


def test_training_is_bit_identical_with_the_callback(tmp_path: Path) -> None:
    plain, watched = TinyModule(), TinyModule()
    _fit(plain, [])
    _fit(watched, [BBDecoderCallback(tmp_path, layers=["net.0"])])
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert set(open_run(tmp_path).scalars("l2").param) == {"net.0.weight", "net.0.bias"}


def test_reserved_arguments_and_lazy_import() -> None:
    with pytest.raises(TypeError, match="scaler"):
        BBDecoderCallback("unused", scaler=object())
    import subprocess

    # in a fresh interpreter: bbdecoder.integrations imports Lightning only when the callback is asked for
    code = (
        "import sys, bbdecoder.integrations as i; before = 'lightning' in sys.modules; "
        "from lightning.pytorch.callbacks import Callback; "
        "print(before, issubclass(i.BBDecoderCallback, Callback), 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]
    import bbdecoder.integrations as integrations

    assert integrations.BBDecoderCallback is BBDecoderCallback


class RootParamModule(TinyModule):
    """A LightningModule that owns a parameter itself (a learned temperature), beside its children."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.temperature


def test_the_modules_own_parameter_is_tracked(tmp_path: Path) -> None:
    module = RootParamModule()
    _fit(module, [BBDecoderCallback(tmp_path)])
    l2 = open_run(tmp_path).scalars("l2").pivot(index="step", columns="param", values="value")
    assert set(l2.columns) == {n for n, p in module.named_parameters() if p.requires_grad}
    for step, before in enumerate(module.before_clip):
        assert l2.loc[step, "temperature"] == pytest.approx(before["temperature"], rel=1e-6)


def test_bbdecoder_import_does_not_import_lightning() -> None:
    import subprocess

    code = "import sys, bbdecoder, bbdecoder.integrations; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_amp_statistics_are_of_the_unscaled_gradients(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    module = TinyModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        gradient_clip_val=CLIP,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[BBDecoderCallback(tmp_path)],
    )
    trainer.fit(module, _loader())
    assert scaler.get_scale() == 1024.0  # the backward passes ran on gradients 1024x too large
    l2 = open_run(tmp_path).scalars("l2").pivot(index="step", columns="param", values="value")
    for step, before in enumerate(module.before_clip):
        for name, norm in before.items():
            assert l2.loc[step, name] == pytest.approx(norm, rel=1e-6)


class IndexedModule(TinyModule):
    """Writes the dataset indices of every batch it trains on to ``record_dir`` (one file per rank
    and step), so the test knows each rank's shard whatever sampler Lightning chose."""

    def __init__(self, record_dir: str | None = None) -> None:
        super().__init__()
        self.record_dir = record_dir

    def training_step(self, batch: tuple[torch.Tensor, ...], idx: int) -> torch.Tensor:
        x, y, indices = batch
        if self.record_dir is not None:
            torch.save(indices, Path(self.record_dir) / f"rank{self.global_rank}_step{idx}.pt")
        return super().training_step((x, y), idx)


def _indexed_dataset() -> torch.utils.data.TensorDataset:
    x, y = _loader().dataset.tensors
    return torch.utils.data.TensorDataset(x, y, torch.arange(len(x)))


def test_ddp_spawn_with_two_ranks_equals_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    common = {"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False, "logger": False,
              "enable_checkpointing": False, "enable_model_summary": False}  # fmt: skip
    ddp_dir, single_dir, shards = tmp_path / "ddp", tmp_path / "single", tmp_path / "shards"
    shards.mkdir()
    dataset = _indexed_dataset()
    pl.Trainer(devices=2, strategy="ddp_spawn", callbacks=[BBDecoderCallback(ddp_dir)], **common).fit(
        IndexedModule(str(shards)), torch.utils.data.DataLoader(dataset, batch_size=8)
    )
    # one process, each step on the union of what the two ranks saw at that step (equal halves, so
    # the mean loss over the union is the mean of the ranks' losses: DDP's averaged gradient)
    steps = len(list(shards.glob("rank0_*")))
    combined = [
        torch.cat([torch.load(shards / f"rank{r}_step{k}.pt") for r in (0, 1)]).tolist() for k in range(steps)
    ]
    pl.Trainer(devices=1, callbacks=[BBDecoderCallback(single_dir)], **common).fit(
        IndexedModule(), torch.utils.data.DataLoader(dataset, batch_sampler=combined)
    )
    assert [p.name for p in ddp_dir.glob("*.sqlite")] == ["run.sqlite"]  # rank 0 wrote, alone
    key = ["step", "param", "stat"]
    ddp = open_run(ddp_dir).scalars().sort_values(key).reset_index(drop=True)
    single = open_run(single_dir).scalars().sort_values(key).reset_index(drop=True)
    assert steps == 2 and len(ddp) == len(single) > 0 and ddp["step"].max() == steps - 1
    pd.testing.assert_frame_equal(ddp[key], single[key])
    np.testing.assert_allclose(ddp["value"], single["value"], rtol=1e-5, atol=1e-8)
