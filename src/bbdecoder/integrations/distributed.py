"""Rank and world size for work split across processes (DDP, torchrun, or explicit arguments)."""

from __future__ import annotations

import torch.distributed as dist


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    Explicit arguments win (give both or neither); otherwise the initialised ``torch.distributed``
    process group decides; otherwise this is the only process, ``(0, 1)``.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"give both rank and world_size or neither (got rank={rank!r}, world_size={world_size!r})"
        )
    if rank is None or world_size is None:
        if distributed_ready():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1} for world_size={world_size}, got {rank}")
    return rank, world_size


def owner_of(item: int, world_size: int) -> int:
    """The rank that handles work item ``item``: round-robin, ``item % world_size``."""
    return item % world_size


def barrier() -> None:
    """Wait for every rank when a process group is initialised; a no-op otherwise."""
    if distributed_ready():
        dist.barrier()
