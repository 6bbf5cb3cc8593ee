"""Copying a store: run.sqlite alone holds every step up to the last epoch end (checkpointed) or
close; ``backup`` makes a single-file copy with every committed step (issue 16, item 6)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.store import RunWriter, StoreError, backup, open_run

CHILD = textwrap.dedent(
    """
    import sys, torch, torch.nn as nn, torch.nn.functional as F
    from bbdecoder.monitor import Analyzer
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    an = Analyzer(model, sys.argv[1]).attach(opt)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 4, (16,))).backward()
            opt.step()
            an.writer.wait()  # the step's commit, handed to the writer thread, is done
            print("step", an.current_step - 1, flush=True)  # committed (flush_every=1)

    for epoch in range(2):
        train(6)
        an.end_epoch()
        print("epoch", epoch, flush=True)
    train(3)  # the third epoch is never closed
    print("waiting", flush=True)
    sys.stdin.readline()  # killed here
    """
)


def _steps(folder) -> list[int]:
    with open_run(folder) as run:
        assert run.integrity_check() == "ok"
        return run.steps()["step"].tolist()


@pytest.mark.timeout(180)
def test_copy_of_run_sqlite_alone_after_a_kill_and_backup(tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = []
        while (line := proc.stdout.readline()) not in ("waiting\n", ""):
            lines.append(line.split())
        committed = [int(n) for kind, n in lines if kind == "step"]
        assert committed == list(range(15))
        assert [int(n) for kind, n in lines if kind == "epoch"] == [0, 1]
        live = backup(tmp_path / "run", tmp_path / "live")  # while the writer is alive (and not blocked)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "run" / "run.sqlite-wal").exists()  # the last commits are still in the WAL
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "run" / "run.sqlite", alone / "run.sqlite")  # the file alone, no -wal
    stored = _steps(alone)
    # every step of the two closed (checkpointed) epochs is in run.sqlite itself; on main: none was
    assert stored[:12] == list(range(12)) and stored == list(range(len(stored)))
    with open_run(alone) as run:
        assert run.epochs()[:2] == [0, 1] and set(run.epoch_scalars()["epoch"]) == {0, 1}
    # backup: a consistent single file holding every committed step, taken live or after the kill
    after = backup(tmp_path / "run", tmp_path / "after.sqlite")
    for copy in (live, after):
        assert copy.parent != tmp_path / "run" and not copy.with_name(copy.name + "-wal").exists()
        assert _steps(copy) == committed
        conn = sqlite3.connect(copy)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        conn.close()
    with pytest.raises(StoreError, match="exists"):
        backup(tmp_path / "run", after)  # never overwrites


def test_close_leaves_everything_in_run_sqlite(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path / "run").attach(optimizer):
        for _ in range(4):
            optimizer.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            optimizer.step()
    assert not (tmp_path / "run" / "run.sqlite-wal").exists()
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "run" / "run.sqlite", tmp_path / "copy" / "run.sqlite")
    assert _steps(tmp_path / "copy") == [0, 1, 2, 3]


def test_checkpoint_with_a_reader_holding_a_snapshot(tmp_path) -> None:
    writer = RunWriter(tmp_path)
    writer.add_step(0, 0, None)
    writer.flush()
    assert writer.checkpoint() is True
    with open_run(tmp_path) as run, run.snapshot():
        run.steps()
        writer.add_step(1, 0, None)
        writer.flush()
        assert writer.checkpoint() is False  # never waits for the reader; step 1 stays in the WAL
    assert writer.checkpoint() is True
    with open_run(tmp_path) as run:
        assert run.backup(tmp_path / "b" / "run.sqlite").exists()
    writer.close()
    assert _steps(tmp_path / "b") == [0, 1]


@pytest.mark.parametrize("aggregates", [True, False])
def test_epoch_end_checkpoints_while_the_writer_stays_open(tmp_path, aggregates: bool) -> None:
    writer = RunWriter(tmp_path / "run")
    sid, mean = writer.series_id(0, "w"), writer.stat_id("mean")
    for step in range(3):
        writer.add_step(step, 0, None)
        writer.add_scalars([(step, 0, sid, mean, 1.0)])
        writer.flush()
    writer.add_epoch_scalars([(0, sid, mean, "mean", 1.0)] if aggregates else [])  # the epoch ends
    writer.flush()
    writer.add_step(3, 1, None)  # a step of the next epoch: only in the WAL
    writer.flush()
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "run" / "run.sqlite", tmp_path / "alone" / "run.sqlite")
    assert _steps(tmp_path / "alone") == [0, 1, 2]
    writer.close()
