"""explain_dataset: chunked, resumable, sharded attribution over a loader, and its reader."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from bbdecoder import GradCAM, Gradient, InputXGradient, SmoothGrad
from bbdecoder.integrations import DatasetMapsError, explain_dataset, open_maps
from bbdecoder.integrations.distributed import owner_of, resolve_rank
from tests.spawn import spawn_ranks

N_SAMPLES, BATCH, CHUNK = 23, 4, 6  # chunks of 2 batches (8 samples): 8 + 8 + 7


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N_SAMPLES, 2, 8, 8, generator=generator), torch.randint(
        0, 3, (N_SAMPLES,), generator=generator
    )


def make_loader(x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, **kwargs)


class Counting:
    """Delegates to an explainer, counts its calls, and can crash on a given call (a killed run)."""

    def __init__(self, inner: Any, crash_on_call: int | None = None) -> None:
        self.inner, self.model, self.calls, self.crash_on_call = inner, inner.model, 0, crash_on_call

    def saliency(self, inputs: torch.Tensor, target: Any = None, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        result: torch.Tensor = self.inner.saliency(inputs, target, **kwargs)
        return result


def smooth(model: nn.Module) -> SmoothGrad:
    return SmoothGrad(Gradient(model), n_samples=3, noise_level=0.2, seed=7)  # random, but seeded per call


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("chunk_")}


# -- results ---------------------------------------------------------------------------------------


def test_maps_equal_per_sample_oracle_and_direct_call(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    explainer = InputXGradient(model)
    maps = explain_dataset(
        explainer, make_loader(x, y), tmp_path, method="attribute", target="label", chunk_size=CHUNK
    )
    # Oracle: one sample at a time, in float64, by autograd on the logit of its label.
    model64 = make_model().double()
    oracle = []
    for xi, yi in zip(x.double(), y, strict=True):
        leaf = xi[None].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model64(leaf)[0, yi], leaf)
        oracle.append((grad * leaf)[0].detach())
    assert maps.complete and len(maps) == N_SAMPLES and maps.shape == (N_SAMPLES, 2, 8, 8)
    torch.testing.assert_close(maps[:].double(), torch.stack(oracle), rtol=1e-5, atol=1e-6)
    assert torch.equal(maps[:], explainer.attribute(x, y))
    assert torch.equal(maps.indices, torch.arange(N_SAMPLES))
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npy") if "indices" not in p.name) == [
        "chunk_000000.npy",
        "chunk_000001.npy",
        "chunk_000002.npy",
    ]
    assert [len(m) for _, m in maps.chunks()] == [8, 8, 7]


def test_reader_indexing_iteration_and_float16(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    maps = explain_dataset(GradCAM(model), make_loader(x, y), tmp_path, chunk_size=CHUNK, dtype=torch.float16)
    direct = GradCAM(model).saliency(x).half()
    assert maps.dtype == torch.float16 and maps[0].dtype == torch.float16
    assert torch.equal(maps[:], direct)
    assert torch.equal(torch.stack(list(maps)), direct)
    assert (
        torch.equal(maps[-1], direct[-1])
        and torch.equal(maps[7], direct[7])
        and torch.equal(maps[8], direct[8])
    )
    assert torch.equal(maps[5:19], direct[5:19]) and torch.equal(maps[::5], direct[::5])
    assert maps[30:].shape == (0, 1, 8, 8)
    assert torch.equal(torch.from_numpy(maps.numpy()), direct)
    with pytest.raises(IndexError, match="out of range"):
        maps[N_SAMPLES]
    with pytest.raises(TypeError, match="int or a slice"):
        maps["0"]  # type: ignore[index]


def test_sampler_order_gives_dataset_indices(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    order = [int(i) for i in torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(3))[:17]]
    loader = DataLoader(TensorDataset(x, y), batch_size=5, sampler=order)
    maps = explain_dataset(Gradient(model), loader, tmp_path, target=2, chunk_size=CHUNK)
    assert maps.indices.tolist() == order
    assert torch.equal(maps[:], Gradient(model).saliency(x[order], 2))


def test_target_callable_and_stream_loader(tmp_path: Path) -> None:
    """A plain iterable of (x, y) is streamed; a callable target gets the batch."""
    model, (x, y) = make_model(), make_data()
    batches = list(zip(x.split(BATCH), y.split(BATCH), strict=True))
    seen: list[int] = []

    def second_best(batch: Any) -> torch.Tensor:
        seen.append(batch[0].shape[0])
        return model(batch[0]).argsort(dim=1)[:, -2]

    maps = explain_dataset(Gradient(model), batches, tmp_path, target=second_best, chunk_size=CHUNK)
    expected = model(x).argsort(dim=1)[:, -2]
    assert torch.equal(maps[:], Gradient(model).saliency(x, expected))
    assert seen == [BATCH] * 5 + [3] and maps.indices.tolist() == list(range(N_SAMPLES))


# -- resuming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["dataloader", "iterable"])
def test_resume_after_crash_recomputes_only_missing_chunks(tmp_path: Path, stream: bool) -> None:
    model, (x, y) = make_model(), make_data()
    loader: Any = list(make_loader(x, y)) if stream else make_loader(x, y)
    settings: dict[str, Any] = {"target": "label", "chunk_size": CHUNK, "progress": False}
    straight = tmp_path / "straight"
    explain_dataset(Counting(smooth(model)), loader, straight, **settings)

    resumed = tmp_path / "resumed"
    crashing = Counting(smooth(model), crash_on_call=4)  # chunk 0 done, crash in chunk 1's 2nd batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        explain_dataset(crashing, loader, resumed, **settings)
    assert sorted(p.name for p in resumed.glob("chunk_*.json")) == ["chunk_000000.json"]
    with pytest.raises(DatasetMapsError, match="incomplete"):
        open_maps(resumed)
    assert len(open_maps(resumed, partial=True)) == 8
    (resumed / ".chunk_000001.npy.tmp-999").write_bytes(b"half a chunk")  # left by a killed writer

    counting = Counting(smooth(model))
    maps = explain_dataset(counting, loader, resumed, **settings)
    assert counting.calls == 6 - 2  # chunk 0's two batches are skipped
    assert files(resumed) == files(straight)  # byte-identical, noise included
    assert not list(resumed.glob(".*tmp*"))
    assert maps.complete and torch.equal(maps[:], open_maps(straight)[:])

    again = Counting(smooth(model))
    explain_dataset(again, loader, resumed, **settings)
    assert again.calls == 0
    explain_dataset(again, loader, resumed, resume=False, **settings)
    assert again.calls == 6 and files(resumed) == files(straight)


def test_chunk_without_marker_is_recomputed(tmp_path: Path) -> None:
    """Data files moved into place but the run died before the marker: the chunk is not complete."""
    model, (x, y) = make_model(), make_data()
    explain_dataset(Counting(Gradient(model)), make_loader(x, y), tmp_path, chunk_size=CHUNK)
    before = files(tmp_path)
    (tmp_path / "chunk_000001.json").unlink()
    (tmp_path / "chunk_000001.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetMapsError, match=r"chunks 1 are missing"):
        open_maps(tmp_path)
    counting = Counting(Gradient(model))
    explain_dataset(counting, make_loader(x, y), tmp_path, chunk_size=CHUNK)
    assert counting.calls == 2 and files(tmp_path) == before


def test_mismatched_settings_on_resume(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    loader = make_loader(x, y)
    explain_dataset(Gradient(model), loader, tmp_path, chunk_size=CHUNK)
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (InputXGradient(model), {}, "explainer differs"),
        (Gradient(model), {"method": "attribute"}, "method differs"),
        (Gradient(model), {"chunk_size": CHUNK + 1}, "chunk_size differs"),
        (Gradient(model), {"dtype": "float16"}, "dtype differs"),
        (Gradient(model), {"target": "label"}, "target differs"),
        (Gradient(model), {"method_kwargs": {"scale": 2}}, "method_kwargs differs"),
    ]
    for explainer, change, message in cases:
        with pytest.raises(DatasetMapsError, match=message):
            explain_dataset(explainer, loader, tmp_path, **{"chunk_size": CHUNK, **change})
    with pytest.raises(DatasetMapsError, match="loader's order or length differs"):
        explain_dataset(Gradient(model), make_loader(x[:-1], y[:-1]), tmp_path, chunk_size=CHUNK)
    # resume=False overwrites with the new settings.
    maps = explain_dataset(InputXGradient(model), loader, tmp_path, chunk_size=CHUNK, resume=False)
    assert torch.equal(maps[:], InputXGradient(model).saliency(x))


def test_changed_stream_length_is_detected(tmp_path: Path) -> None:
    model, (x, _) = make_model(), make_data()
    explain_dataset(Gradient(model), list(x.split(BATCH)), tmp_path, chunk_size=CHUNK)
    with pytest.raises(DatasetMapsError, match="loader changed"):
        explain_dataset(Gradient(model), list(x.split(3)), tmp_path, chunk_size=CHUNK)


# -- sharding --------------------------------------------------------------------------------------


def test_explicit_ranks_write_disjoint_shards(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    single = explain_dataset(Counting(smooth(model)), make_loader(x, y), tmp_path / "one", chunk_size=4)
    rank0 = Counting(smooth(model))
    explain_dataset(rank0, make_loader(x, y), tmp_path / "two", chunk_size=4, rank=0, world_size=2)
    assert rank0.calls == 3  # chunks 0, 2, 4 of 6
    with pytest.raises(DatasetMapsError, match=r"chunks 1, 3, 5 are missing"):
        open_maps(tmp_path / "two")
    partial = open_maps(tmp_path / "two", partial=True)
    assert partial.missing_chunks == [1, 3, 5] and partial.indices.tolist() == [
        0,
        1,
        2,
        3,
        8,
        9,
        10,
        11,
        16,
        17,
        18,
        19,
    ]
    rank1 = Counting(smooth(model))
    explain_dataset(rank1, make_loader(x, y), tmp_path / "two", chunk_size=4, rank=1, world_size=2)
    assert rank1.calls == 3
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert torch.equal(open_maps(tmp_path / "two")[:], single[:])


def test_progress_bar_counts_batches_to_do_and_shows_on_rank_0_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = importlib.import_module("bbdecoder.integrations.dataset_maps")
    bars: list[dict[str, Any]] = []

    bar_class: Any = module.tqdm

    class Recorder(bar_class):
        def __init__(self, **kwargs: Any) -> None:
            bars.append(kwargs)
            super().__init__(**{**kwargs, "disable": True})

    monkeypatch.setattr(module, "tqdm", Recorder)
    model, (x, y) = make_model(), make_data()
    explain_dataset(Gradient(model), make_loader(x, y), tmp_path, chunk_size=CHUNK, rank=1, world_size=2)
    explain_dataset(Gradient(model), make_loader(x, y), tmp_path, chunk_size=CHUNK, rank=0, world_size=2)
    explain_dataset(Gradient(model), make_loader(x, y), tmp_path, chunk_size=CHUNK, progress=False)
    assert [bar["total"] for bar in bars] == [2, 4, 0]  # rank 1: chunk 1; rank 0: chunks 0 and 2; none
    assert [bar["disable"] for bar in bars] == [True, None, True]  # None: tqdm hides it off a terminal


def _ddp_worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        x, y = make_data()
        maps = explain_dataset(smooth(make_model()), make_loader(x, y), f"{folder}/ddp", chunk_size=CHUNK)
        assert maps.complete  # every rank waited for the others
        assert len(maps) == N_SAMPLES
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run_equals_one_process(tmp_path: Path) -> None:
    spawn_ranks(_ddp_worker, (2, str(tmp_path)))
    x, y = make_data()
    single = explain_dataset(smooth(make_model()), make_loader(x, y), tmp_path / "one", chunk_size=CHUNK)
    assert files(tmp_path / "ddp") == files(tmp_path / "one")
    assert torch.equal(open_maps(tmp_path / "ddp")[:], single[:])


def test_resolve_rank() -> None:
    assert resolve_rank() == (0, 1)
    assert resolve_rank(2, 3) == (2, 3)
    assert [owner_of(i, 3) for i in range(5)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="both rank and world_size"):
        resolve_rank(rank=1)
    with pytest.raises(ValueError, match=r"rank must be in 0\.\.1"):
        resolve_rank(2, 2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        resolve_rank(0, 0)


# -- bad input -------------------------------------------------------------------------------------


def test_shuffled_and_distributed_samplers_are_refused(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    with pytest.raises(DatasetMapsError, match="shuffle=False"):
        explain_dataset(Gradient(model), make_loader(x, y, shuffle=True), tmp_path)
    sampler: DistributedSampler[Any] = DistributedSampler(
        TensorDataset(x, y), num_replicas=2, rank=0, shuffle=False
    )
    with pytest.raises(DatasetMapsError, match="DistributedSampler"):
        explain_dataset(Gradient(model), make_loader(x, y, sampler=sampler), tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_empty_loaders_are_refused(tmp_path: Path) -> None:
    model = make_model()
    empty = TensorDataset(torch.zeros(0, 2, 8, 8))
    with pytest.raises(DatasetMapsError, match="no batches"):
        explain_dataset(Gradient(model), DataLoader(empty, batch_size=4), tmp_path / "a")
    with pytest.raises(DatasetMapsError, match="no batches"):
        explain_dataset(Gradient(model), [], tmp_path / "b")


def test_bad_arguments(tmp_path: Path) -> None:
    model, (x, y) = make_model(), make_data()
    loader = make_loader(x, y)
    with pytest.raises(ValueError, match="method must be one of"):
        explain_dataset(Gradient(model), loader, tmp_path, method="cam")
    with pytest.raises(ValueError, match="dtype must be one of"):
        explain_dataset(Gradient(model), loader, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        explain_dataset(Gradient(model), loader, tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="'label'"):
        explain_dataset(Gradient(model), loader, tmp_path, target="labels")
    with pytest.raises(TypeError, match=r"per-sample classes .* target='label'"):
        explain_dataset(Gradient(model), loader, tmp_path, target=y)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="has no attribute"):
        explain_dataset(GradCAM(model), loader, tmp_path, method="attribute")
    with pytest.raises(TypeError, match=r"x or \(x, y, \.\.\.\)"):
        explain_dataset(Gradient(model), [{"image": x}], tmp_path / "dict")
    with pytest.raises(DatasetMapsError, match="needs a loader that yields"):
        explain_dataset(Gradient(model), [x], tmp_path / "nolabel", target="label")
    with pytest.raises(DatasetMapsError, match="not an explain_dataset output"):
        open_maps(tmp_path / "nowhere")
