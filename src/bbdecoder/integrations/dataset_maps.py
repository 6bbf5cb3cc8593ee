"""Attribution maps for a whole dataset, written to disk in resumable chunks, shardable across ranks.

Layout of ``out_dir``::

    manifest.json               the run's settings (explainer, method, chunk size, dtype, ...)
    chunk_000000.npy            maps of chunk 0, (n, *map_shape), float16/32/64
    chunk_000000.indices.npy    their dataset indices, (n,), int64
    chunk_000000.json           written last: chunk 0 is complete

A chunk holds whole batches: it is closed as soon as it has at least ``chunk_size`` samples, so the
chunks are the same in every run over the same loader. Every file is written to a temporary name and
moved into place with :func:`os.replace`; the ``.json`` marker comes last, so a killed run never leaves
a half-written chunk marked complete. Chunk ``i`` belongs to rank ``i % world_size``; each rank only
writes its own chunks, and no file is written by two ranks except ``manifest.json`` (same content).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from bbdecoder.attribution.base import Explainer
from bbdecoder.integrations.distributed import barrier, owner_of, resolve_rank

FORMAT = "bbdecoder.explain_dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METHODS = ("saliency", "attribute")
STORAGE_DTYPES = ("float16", "float32", "float64")
# Settings that must match for a resumed run to continue the chunks already on disk.
CHECKED_SETTINGS = ("explainer", "method", "method_kwargs", "target", "chunk_size", "dtype", "order")
_CHUNK_FILE = re.compile(r"^\.?chunk_(\d+)\.")

TargetSpec = None | int | str | Callable[[Any], Any]


class DatasetMapsError(ValueError):
    """An output folder that does not fit the run: other settings, missing chunks, wrong loader order."""


# -- the writer ------------------------------------------------------------------------------------


def explain_dataset(
    explainer: Any,
    loader: Iterable[Any],
    out_dir: str | os.PathLike[str],
    *,
    method: str = "saliency",
    target: TargetSpec = None,
    method_kwargs: Mapping[str, Any] | None = None,
    chunk_size: int = 1024,
    resume: bool = True,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
) -> DatasetMaps:
    """Explain every sample of ``loader`` and write the maps to ``out_dir`` in chunk files.

    Args:
        explainer: any BBDecoder explainer (``FullGrad``, ``GradCAM``, ``IntegratedGradients``, ...),
            or any object with the chosen ``method``.
        loader: a ``DataLoader`` (or any iterable) yielding ``x`` or ``(x, y, ...)`` with ``x`` shaped
            ``(B, C, H, W)``, in a deterministic order (no ``shuffle=True``: resuming needs the same
            order). Give the loader over the *whole* dataset also under DDP, without a
            ``DistributedSampler``: the ranks split the chunks among themselves.
        out_dir: the output folder (created if missing).
        method: ``"saliency"`` (maps ``(B, 1, H, W)``) or ``"attribute"`` (shaped like ``x``).
        target: ``None`` (each sample's arg-max class), ``"label"`` (the loader's ``y``), an ``int``
            (that class for all), or a callable ``f(batch) -> target`` returning anything the
            explainer takes as ``target`` for that batch (classes ``(B,)``, or a callable on the output).
        method_kwargs: extra keyword arguments for the method, e.g. ``{"n_steps": 32}``.
        chunk_size: samples per chunk file, rounded up to whole batches.
        resume: keep the complete chunks already in ``out_dir`` and compute only the rest (the
            settings must match); ``False`` deletes this rank's chunks and starts over.
        progress: a tqdm bar over batches on rank 0 (hidden when stderr is not a terminal).
        rank: this process's shard; default: from ``torch.distributed`` when it is initialised,
            else 0. Chunk ``i`` is computed by rank ``i % world_size``.
        world_size: the number of shards; default: from ``torch.distributed``, else 1.
        device: where the inputs go; default: the device of the explainer's model.
        dtype: storage precision, ``"float16"``, ``"float32"`` or ``"float64"`` (or the torch dtype).

    Returns:
        :class:`DatasetMaps` over the chunks complete in ``out_dir`` when this rank is done; under
        ``torch.distributed`` all ranks wait for each other first, so it holds the whole dataset.

    Resumed and sharded runs give byte-identical files to one uninterrupted run when the explainer
    is deterministic (seeded noise included): every chunk is computed from the same batches.
    """
    synchronise = rank is None and world_size is None
    rank, world_size = resolve_rank(rank, world_size)
    settings = _settings(explainer, method, method_kwargs, target, chunk_size, dtype)
    _check_explainer(explainer, method)
    source = _ChunkSource.of(loader, chunk_size)
    settings["order"] = source.order_fingerprint
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_manifest(out, settings)
    else:
        _delete_own_chunks(out, rank, world_size)
    _remove_stale_temporaries(out, rank, world_size)
    _write_manifest(out, settings, source.num_chunks, source.num_samples)

    def todo(chunk: int) -> bool:
        return owner_of(chunk, world_size) == rank and not _is_complete(out, chunk)

    device = _default_device(explainer) if device is None else torch.device(device)
    storage = getattr(torch, settings["dtype"])
    run = getattr(explainer, method)
    kwargs = dict(method_kwargs or {})

    bar = tqdm(
        total=source.batches_to_load(todo),
        disable=None if progress and rank == 0 else True,
        desc="explain_dataset",
        unit="batch",
    )
    pending: _PendingChunk | None = None
    batches_seen = 0
    with bar:
        for chunk, indices, batch in source.batches(todo):
            if pending is None or pending.chunk != chunk:
                if pending is not None:
                    pending.finish(out)
                pending = _PendingChunk(chunk, compute=todo(chunk))
            batches_seen += 1
            pending.indices.append(indices)
            if pending.compute:
                inputs, labels = _split_batch(batch)
                if inputs.shape[0] != len(indices):
                    raise DatasetMapsError(
                        f"a batch holds {inputs.shape[0]} inputs but its sampler gave {len(indices)} "
                        "indices; the loader's collate_fn must keep one input per dataset item"
                    )
                batch_target = _batch_target(target, batch, labels, device)
                maps = run(inputs.to(device), batch_target, **kwargs)
                pending.maps.append(maps.detach().to(device="cpu", dtype=storage).numpy())
            bar.update(1)
        if pending is not None:
            pending.finish(out)
    if source.num_chunks is None:
        if batches_seen == 0:
            raise DatasetMapsError("the loader yielded no batches: there is nothing to explain")
        assert pending is not None
        _write_manifest(out, settings, pending.chunk + 1, int(pending.end_position))
    if synchronise:
        barrier()  # every rank's chunks are on disk before anyone reads them
    return open_maps(out, partial=True)


def _settings(
    explainer: Any,
    method: str,
    method_kwargs: Mapping[str, Any] | None,
    target: TargetSpec,
    chunk_size: int,
    dtype: str | torch.dtype,
) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (samples per chunk file), got {chunk_size!r}")
    name = str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    kind = type(explainer)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "explainer": f"{kind.__module__}.{kind.__qualname__}",
        "method": method,
        "method_kwargs": repr(sorted((method_kwargs or {}).items())),
        "target": _describe_target(target),
        "chunk_size": chunk_size,
        "dtype": name,
    }


def _describe_target(target: TargetSpec) -> str:
    if target is None:
        return "argmax"
    if isinstance(target, bool):
        raise TypeError("target cannot be a bool")
    if isinstance(target, int):
        return f"class {target}"
    if isinstance(target, str):
        if target != "label":
            raise ValueError(
                f"target must be None, 'label', an int or a callable f(batch), got the string {target!r}"
            )
        return "label"
    if callable(target):
        return f"callable {getattr(target, '__qualname__', type(target).__qualname__)}"
    raise TypeError(
        f"target must be None, 'label', an int or a callable f(batch) -> targets, got "
        f"{type(target).__name__}; per-sample classes for the whole dataset come from the loader "
        "(yield (x, y) and pass target='label')"
    )


def _check_explainer(explainer: Any, method: str) -> None:
    bound = getattr(type(explainer), method, None)
    if not callable(bound) or (isinstance(explainer, Explainer) and bound is Explainer.attribute):
        raise TypeError(f"{type(explainer).__name__} has no {method}() method; use method='saliency'")
    model = getattr(explainer, "model", None)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(
            "the explainer wraps a DistributedDataParallel model; build it on the plain model "
            "(ddp_model.module): explain_dataset shards the data itself and needs no gradient sync"
        )


def _default_device(explainer: Any) -> torch.device:
    model = getattr(explainer, "model", None)
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
        for buffer in model.buffers():
            return buffer.device
    return torch.device("cpu")


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    """The inputs and, when present, the labels (second item) of one batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise TypeError(
        f"the loader must yield x or (x, y, ...) with x a tensor, got a {type(batch).__name__}; "
        "wrap it, e.g. ((b['image'], b['label']) for b in loader) or a collate_fn that returns a tuple"
    )


def _batch_target(target: TargetSpec, batch: Any, labels: Any, device: torch.device) -> Any:
    if target == "label":
        if labels is None:
            raise DatasetMapsError("target='label' needs a loader that yields (x, y, ...); it yielded only x")
        return labels.to(device) if isinstance(labels, torch.Tensor) else labels
    if callable(target):
        return target(batch)
    return target


# -- where the batches come from -------------------------------------------------------------------


@dataclass
class _ChunkSource:
    """The loader's batches grouped into chunks.

    A map-style ``DataLoader`` is planned ahead from its batch sampler: its batches' dataset indices
    are known without loading anything, so skipped chunks are never loaded. Any other iterable is
    streamed: every batch is loaded, only the chunks to compute go through the explainer, and the
    indices are the running sample positions.
    """

    loader: Iterable[Any]
    chunk_size: int
    planned: list[list[list[int]]] | None = None  # chunk -> batches -> dataset indices
    order_fingerprint: str | None = None

    @classmethod
    def of(cls, loader: Iterable[Any], chunk_size: int) -> _ChunkSource:
        if isinstance(loader, DataLoader):
            _check_deterministic(loader)
            if not isinstance(loader.dataset, IterableDataset) and loader.batch_sampler is not None:
                batches = [list(map(int, b)) for b in loader.batch_sampler]
                if not batches:
                    raise DatasetMapsError(
                        "the loader yields no batches (empty dataset?): nothing to explain"
                    )
                return cls(loader, chunk_size, _group(batches, chunk_size), _fingerprint(batches))
        return cls(loader, chunk_size)

    @property
    def num_chunks(self) -> int | None:
        return None if self.planned is None else len(self.planned)

    @property
    def num_samples(self) -> int | None:
        return None if self.planned is None else sum(len(b) for chunk in self.planned for b in chunk)

    def batches_to_load(self, todo: Callable[[int], bool]) -> int | None:
        if self.planned is None:
            return len(self.loader) if hasattr(self.loader, "__len__") else None  # type: ignore[arg-type]
        return sum(len(batches) for chunk, batches in enumerate(self.planned) if todo(chunk))

    def batches(self, todo: Callable[[int], bool]) -> Iterator[tuple[int, np.ndarray, Any]]:
        """``(chunk, dataset indices (B,), batch)`` in loader order; planned: only chunks to do."""
        if self.planned is None:
            yield from _stream(self.loader, self.chunk_size)
            return
        wanted = [(chunk, b) for chunk, batches in enumerate(self.planned) if todo(chunk) for b in batches]
        if not wanted:
            return
        assert isinstance(self.loader, DataLoader)
        subset = _loader_over(self.loader, [b for _, b in wanted])
        for (chunk, indices), batch in zip(wanted, subset, strict=True):
            yield chunk, np.asarray(indices, dtype=np.int64), batch


def _check_deterministic(loader: DataLoader[Any]) -> None:
    sampler = loader.sampler
    if isinstance(loader.batch_sampler, BatchSampler):
        sampler = loader.batch_sampler.sampler
    if isinstance(sampler, DistributedSampler):
        raise DatasetMapsError(
            "the loader uses a DistributedSampler; give every rank a loader over the whole dataset "
            "in a fixed order (shuffle=False, no sampler): explain_dataset splits the chunks among ranks"
        )
    if isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)):
        raise DatasetMapsError(
            f"the loader draws samples at random ({type(sampler).__name__}, e.g. shuffle=True): chunks "
            "could not be resumed or sharded reproducibly; build it with shuffle=False"
        )


def _group(batches: list[list[int]], chunk_size: int) -> list[list[list[int]]]:
    chunks: list[list[list[int]]] = [[]]
    filled = 0
    for batch in batches:
        if filled >= chunk_size:
            chunks.append([])
            filled = 0
        chunks[-1].append(batch)
        filled += len(batch)
    return chunks


def _fingerprint(batches: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(np.asarray(batch, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _stream(loader: Iterable[Any], chunk_size: int) -> Iterator[tuple[int, np.ndarray, Any]]:
    chunk, filled, position = 0, 0, 0
    for batch in loader:
        if filled >= chunk_size:
            chunk, filled = chunk + 1, 0
        size = _split_batch(batch)[0].shape[0]
        yield chunk, np.arange(position, position + size, dtype=np.int64), batch
        position += size
        filled += size


def _loader_over(loader: DataLoader[Any], batches: list[list[int]]) -> DataLoader[Any]:
    """The same loader (dataset, collate, workers) restricted to the given batches, in that order."""
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers > 0 else None,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        pin_memory_device=getattr(loader, "pin_memory_device", ""),
    )


# -- files -----------------------------------------------------------------------------------------


@dataclass
class _PendingChunk:
    chunk: int
    compute: bool
    indices: list[np.ndarray] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)

    @property
    def end_position(self) -> int:
        return int(self.indices[-1][-1]) + 1

    def finish(self, out: Path) -> None:
        indices = np.concatenate(self.indices)
        if self.compute:
            maps = np.concatenate(self.maps)
            _atomic_write(out / _name(self.chunk, ".npy"), lambda f: np.save(f, maps))
            _atomic_write(out / _name(self.chunk, ".indices.npy"), lambda f: np.save(f, indices))
            marker = {"chunk": self.chunk, "num_samples": len(indices), "shape": list(maps.shape)}
            marker["dtype"] = str(maps.dtype)
            _atomic_write(out / _name(self.chunk, ".json"), lambda f: f.write(json.dumps(marker).encode()))
        elif _is_complete(out, self.chunk):
            done = _read_json(out / _name(self.chunk, ".json"))["num_samples"]
            if done != len(indices):
                raise DatasetMapsError(
                    f"chunk {self.chunk} on disk holds {done} samples but the loader now gives "
                    f"{len(indices)}: the loader changed since the first run; use resume=False"
                )


def _name(chunk: int, suffix: str) -> str:
    return f"chunk_{chunk:06d}{suffix}"


def _is_complete(out: Path, chunk: int) -> bool:
    return (out / _name(chunk, ".json")).is_file()


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temporary file in the same folder, flushed to disk, then moved into place."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as handle:
        loaded: dict[str, Any] = json.load(handle)
    return loaded


def _write_manifest(
    out: Path, settings: dict[str, Any], num_chunks: int | None, num_samples: int | None
) -> None:
    manifest = {**settings, "num_chunks": num_chunks, "num_samples": num_samples}
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    _atomic_write(out / MANIFEST, lambda f: f.write(text))


def _check_manifest(out: Path, settings: dict[str, Any]) -> None:
    path = out / MANIFEST
    if not path.is_file():
        if any(out.glob("chunk_*.json")):
            raise DatasetMapsError(
                f"{out} holds chunk files but no {MANIFEST}; use resume=False or another folder"
            )
        return
    saved = _read_json(path)
    if saved.get("format") != FORMAT:
        raise DatasetMapsError(f"{path} is not an explain_dataset manifest; pick another out_dir")
    if saved.get("version") != FORMAT_VERSION:
        raise DatasetMapsError(
            f"{out} was written by format version {saved.get('version')}, this is {FORMAT_VERSION}; "
            "use resume=False to start over"
        )
    for key in CHECKED_SETTINGS:
        if key == "order" and (saved.get(key) is None or settings[key] is None):
            continue
        if saved.get(key) != settings[key]:
            what = "the loader's order or length" if key == "order" else f"{key}"
            raise DatasetMapsError(
                f"cannot resume in {out}: {what} differs from the run that wrote it "
                f"(on disk {saved.get(key)!r}, now {settings[key]!r}); use the same settings, "
                "resume=False to overwrite, or another out_dir"
            )


def _chunk_ids(out: Path, pattern: str) -> list[tuple[int, Path]]:
    found = []
    for path in out.glob(pattern):
        match = _CHUNK_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def _delete_own_chunks(out: Path, rank: int, world_size: int) -> None:
    for chunk, path in _chunk_ids(out, "chunk_*"):
        if owner_of(chunk, world_size) == rank:
            path.unlink(missing_ok=True)


def _remove_stale_temporaries(out: Path, rank: int, world_size: int) -> None:
    """Leftovers of a killed run (never marked complete); each rank clears its own chunks' only."""
    for chunk, path in _chunk_ids(out, ".chunk_*.tmp-*"):
        if owner_of(chunk, world_size) == rank:
            path.unlink(missing_ok=True)


# -- the reader ------------------------------------------------------------------------------------


def open_maps(out_dir: str | os.PathLike[str], *, partial: bool = False) -> DatasetMaps:
    """Read the maps that :func:`explain_dataset` wrote, in dataset (loader) order.

    Args:
        out_dir: the folder given to :func:`explain_dataset`.
        partial: ``False`` raises :class:`DatasetMapsError` naming the missing chunks unless the run
            is complete; ``True`` opens the chunks complete so far (``.missing_chunks`` lists the rest).

    Chunk files are memory-mapped: opening is cheap and samples are read when indexed.
    """
    out = Path(out_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise DatasetMapsError(f"{out} has no {MANIFEST}: it is not an explain_dataset output folder")
    manifest = _read_json(path)
    complete = sorted(chunk for chunk, _ in _chunk_ids(out, "chunk_*.json"))
    num_chunks = manifest.get("num_chunks")
    expected = range(num_chunks) if num_chunks is not None else range(max(complete, default=-1) + 1)
    missing = sorted(set(expected) - set(complete))
    if not partial and (missing or num_chunks is None):
        detail = f"chunks {_short_list(missing)} are missing" if missing else "the run has not finished"
        raise DatasetMapsError(
            f"{out} is incomplete: {detail}; rerun explain_dataset with the same arguments (it resumes), "
            "or open_maps(..., partial=True) for what is there"
        )
    return DatasetMaps(out, manifest, [c for c in complete if c in expected], missing)


def _short_list(items: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class DatasetMaps:
    """Maps of a dataset, concatenated over chunk files in loader order.

    ``len(maps)`` samples; ``maps[i]`` a tensor shaped like one map (e.g. ``(1, H, W)``); ``maps[a:b]``
    a stacked tensor; iteration yields one map at a time; ``maps.indices`` the dataset index of
    every sample, ``(len,)`` int64; ``maps.chunks()`` yields ``(indices, maps)`` per chunk file.
    """

    def __init__(self, out_dir: Path, manifest: dict[str, Any], chunks: list[int], missing: list[int]):
        self.out_dir = out_dir
        self.settings = manifest
        self.chunk_ids = chunks
        self.missing_chunks = missing
        self._maps = [np.load(out_dir / _name(c, ".npy"), mmap_mode="r") for c in chunks]
        self._indices = [np.load(out_dir / _name(c, ".indices.npy")) for c in chunks]
        shapes = {m.shape[1:] for m in self._maps}
        if len(shapes) > 1:
            raise DatasetMapsError(f"the chunks in {out_dir} hold maps of different shapes: {sorted(shapes)}")
        self._offsets = np.cumsum([0] + [len(m) for m in self._maps])

    @property
    def complete(self) -> bool:
        """True when every chunk of a finished run is present."""
        return not self.missing_chunks and self.settings.get("num_chunks") is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len, *map_shape)``."""
        inner = self._maps[0].shape[1:] if self._maps else ()
        return (len(self), *inner)

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the maps."""
        dtype: torch.dtype = getattr(torch, self.settings["dtype"])
        return dtype

    @property
    def indices(self) -> torch.Tensor:
        """The dataset index of every sample, ``(len,)`` int64 (positions for plain iterables)."""
        if not self._indices:
            return torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.concatenate(self._indices))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, item: int | slice) -> torch.Tensor:
        if isinstance(item, slice):
            positions = range(*item.indices(len(self)))
            if not positions:
                return torch.zeros((0, *self.shape[1:]), dtype=self.dtype)
            if positions.step == 1:
                return self._range(positions.start, positions.stop)
            return torch.stack([self[i] for i in positions])
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"index maps with an int or a slice, got {type(item).__name__}")
        position = int(item) + len(self) if item < 0 else int(item)
        if not 0 <= position < len(self):
            raise IndexError(f"index {item} is out of range for {len(self)} maps")
        chunk = int(np.searchsorted(self._offsets, position, side="right")) - 1
        return torch.from_numpy(np.array(self._maps[chunk][position - self._offsets[chunk]]))

    def _range(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        for chunk, maps in enumerate(self._maps):
            low, high = int(self._offsets[chunk]), int(self._offsets[chunk + 1])
            if high > start and low < stop:
                parts.append(np.array(maps[max(start, low) - low : min(stop, high) - low]))
        return torch.from_numpy(np.concatenate(parts))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for maps in self._maps:
            for row in maps:
                yield torch.from_numpy(np.array(row))

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(dataset indices (n,), maps (n, *map_shape))`` for each chunk file, in order."""
        for indices, maps in zip(self._indices, self._maps, strict=True):
            yield torch.from_numpy(indices), torch.from_numpy(np.array(maps))

    def numpy(self) -> np.ndarray:
        """All maps in one array ``(len, *map_shape)`` (loaded into memory)."""
        return np.concatenate([np.asarray(m) for m in self._maps]) if self._maps else np.zeros((0,))

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing_chunks)} chunks missing"
        return (
            f"DatasetMaps({str(self.out_dir)!r}, shape={self.shape}, dtype={self.settings['dtype']}, {state})"
        )
