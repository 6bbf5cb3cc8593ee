"""Spawning CPU ranks for the distributed tests, with a deadline: a hang fails the test and kills
the ranks instead of blocking the suite. Each rank's stderr (the C++ runtime's messages included)
and, on a fatal signal, the Python stacks of its threads go to a log whose tail is in the failure.

A rank whose worker returned leaves with ``os._exit(0)`` after a garbage collection: what the tests
check is done by then, and the interpreter's finalizer, which frees torch's C++ distributed state
(gloo's threads and pending work held by the models' reference cycles) in whatever order it picks,
aborted a rank in two full-suite runs ("terminate called without an active exception", SIGABRT; not
reproduced in 70 standalone runs under load nor in two more full suites)."""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

DEADLINE = timedelta(minutes=8)  # generous: a loaded 2-core machine is slow, never a hang
LOG_TAIL = 4000  # characters of each failed rank's log in the failure message


def _logged_rank(rank: int, worker: Callable[..., None], log_dir: str, *args: Any) -> None:
    log = open(Path(log_dir) / f"rank{rank}.log", "w", buffering=1)  # noqa: SIM115 (the process's life)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    worker(rank, *args)
    gc.collect()  # the models' cycles (hooks, FSDP state) freed while the interpreter is whole
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _failure(world: int, log_dir: Path, why: str) -> AssertionError:
    tails = []
    for rank in range(world):
        path = log_dir / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        if text.strip():
            tails.append(f"--- rank {rank} stderr (last {LOG_TAIL} characters) ---\n{text[-LOG_TAIL:]}")
    return AssertionError("\n".join([why, *tails]))


def spawn_ranks(worker: Callable[..., None], args: tuple[Any, ...], world: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world`` fresh single-threaded processes and wait at most
    :data:`DEADLINE`; a rank that fails fails the caller with its error and its stderr."""
    single_threaded = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="bbdecoder-ranks-") as logs:
        log_dir = Path(logs)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in single_threaded.items():
                patch.setenv(name, value)
            context = mp.start_processes(
                _logged_rank, args=(worker, logs, *args), nprocs=world, join=False, start_method="spawn"
            )
        deadline = time.monotonic() + DEADLINE.total_seconds()
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise _failure(world, log_dir, f"the {world} ranks did not finish within {DEADLINE}")
        except mp.ProcessRaisedException as err:
            raise _failure(world, log_dir, str(err)) from None
        except mp.ProcessExitedException as err:
            raise _failure(world, log_dir, str(err)) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
