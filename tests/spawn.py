"""Spawning CPU ranks for the distributed tests, with a deadline: a hang fails the test and kills
the ranks instead of blocking the suite."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch.multiprocessing as mp

DEADLINE = timedelta(minutes=8)  # generous: a loaded 2-core machine is slow, never a hang


def spawn_ranks(worker: Callable[..., None], args: tuple[Any, ...], world: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world`` fresh single-threaded processes and wait at most
    :data:`DEADLINE`; a rank that fails fails the caller with its traceback (or signal)."""
    single_threaded = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in single_threaded.items():
            patch.setenv(name, value)
        context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE.total_seconds()
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the {world} ranks did not finish within {DEADLINE}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
