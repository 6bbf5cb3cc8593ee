"""A full disk or an unwritable folder never ends training: writes are buffered (bounded), warned
about once, written when space returns; close() always closes; failures at open raise StoreError
with the path (issue 16, item 4)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.store import RunWriter, StoreError, StoreWriteWarning, open_run

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "COMMIT")


class FullDisk:
    """A connection whose writes fail like SQLite's on a full disk while ``full`` is set."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.full, self.failures = conn, True, 0

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip().upper().startswith(WRITES):
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args):
        self._check(sql)
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, rows):
        self._check(sql)
        return self.conn.executemany(sql, rows)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def _write_step(writer: RunWriter, step: int, n: int = 4) -> None:
    sid, stat = writer.series_id(0, "w"), writer.stat_id("mean")
    writer.add_step(step, 0, float(step))
    writer.add_scalars([(step, 0, sid, stat, float(step * 10 + j)) for j in range(n)])


def _store_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, StoreWriteWarning)]


def test_full_disk_warns_once_buffers_and_writes_when_space_returns(tmp_path) -> None:
    writer = RunWriter(tmp_path, retry_seconds=0)
    disk = writer._conn = FullDisk(writer._conn)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(5):
            _write_step(writer, step)
            writer.flush()  # on main: sqlite3.OperationalError out of the training step
        assert writer.failing and disk.failures >= 5  # every flush tried again
        messages = _store_warnings(record)
        assert len(messages) == 1, messages  # warned once
        assert str(writer.path) in messages[0] and "database or disk is full" in messages[0]
        with open_run(tmp_path) as run:
            assert run.steps().empty  # nothing half-written meanwhile
        disk.full = False
        writer.flush()
        assert not writer.failing and writer.pending == 0
        assert any("writable again" in m for m in _store_warnings(record))
    writer.close()
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3, 4]
        values = run.scalars().sort_values(["step", "value"])["value"].tolist()
        assert values == [float(s * 10 + j) for s in range(5) for j in range(4)]


def test_close_always_closes_on_a_full_disk(tmp_path) -> None:
    writer = RunWriter(tmp_path, retry_seconds=0)
    real = writer._conn
    writer._conn = FullDisk(real)
    _write_step(writer, 0)
    with pytest.warns(StoreWriteWarning) as record:
        writer.close()  # on main: raised again and left the connection open
    assert any("could not be written before closing" in m for m in _store_warnings(record))
    assert writer.closed
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        real.execute("SELECT 1")
    writer.close()  # idempotent
    RunWriter(tmp_path).close()  # the lock was released


def test_buffer_is_bounded_dropping_whole_oldest_steps(tmp_path) -> None:
    writer = RunWriter(tmp_path, retry_seconds=0, max_buffer_bytes=20 * 120)  # about 4 steps of 5 rows
    disk = writer._conn = FullDisk(writer._conn)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(30):
            _write_step(writer, step)
            writer.flush()
        assert any("oldest buffered steps are dropped" in m for m in _store_warnings(record))
    assert writer.pending <= 20 + 2  # the bound (and the two catalog rows)
    disk.full = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWriteWarning)
        writer.close()
    with open_run(tmp_path) as run:
        stored = run.steps()["step"].tolist()
        scalars = run.scalars()
        gap = run.events(kind="store_gap")
    assert stored and stored == list(range(stored[0], 30))  # the newest steps, contiguous
    assert scalars.groupby("step").size().to_dict() == dict.fromkeys(stored, 4)  # each one whole
    assert len(gap) == 1 and gap.loc[0, "data"]["steps"] == list(range(stored[0]))


def test_analyzer_trains_through_a_full_disk(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    analyzer = Analyzer(model, tmp_path).attach(optimizer)
    analyzer.writer.retry_seconds = 0
    disk = analyzer.writer._conn = FullDisk(analyzer.writer._conn)

    def train_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 2, (5,))).backward()
        optimizer.step()

    with pytest.warns(StoreWriteWarning, match="cannot write the run store"):
        for _ in range(3):
            train_step()
        analyzer.end_epoch()
    disk.full = False
    with pytest.warns(StoreWriteWarning, match="writable again"):
        train_step()  # its commit (on the writer thread) writes the kept rows ...
        train_step()  # ... and the next step, which waits for that commit, reports it
    analyzer.close()
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3, 4]
        assert run.epochs() == [0, 1]
        assert len(run.epoch_scalars()) > 0


def test_open_failures_raise_store_error_with_the_path(tmp_path) -> None:
    (tmp_path / "run.sqlite").mkdir()
    with pytest.raises(StoreError, match=f"{tmp_path / 'run.sqlite'} is a directory"):
        RunWriter(tmp_path)
    with pytest.raises(StoreError, match="is a directory"):
        open_run(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=f"cannot create the run store folder {tmp_path / 'file'}"):
        RunWriter(tmp_path / "file" / "run")


# -- a real small file system --------------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(mount_point, size: str = "1m"):
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount is not permitted here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(folder) -> None:
    """Write a filler file until the file system is full."""
    chunk = b"\0" * 4096
    with open(folder / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(chunk)


@pytest.mark.timeout(120)
def test_real_full_tmpfs(tmp_path) -> None:
    with _tmpfs(tmp_path / "mnt", "2m") as mnt:
        writer = RunWriter(mnt / "run", retry_seconds=0)
        writer.flush()
        _fill(mnt)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for step in range(6):
                _write_step(writer, step, n=2000)  # each flush needs new WAL pages
                writer.flush()
            assert writer.failing
            messages = _store_warnings(record)
            assert len(messages) == 1 and str(mnt / "run" / "run.sqlite") in messages[0]
            (mnt / "filler").unlink()  # space returns
            _write_step(writer, 6, n=2000)
            writer.flush()
            assert not writer.failing
        writer.close()
        with open_run(mnt / "run") as run:
            assert run.steps()["step"].tolist() == list(range(7))
            assert run.integrity_check() == "ok"
            counts = run.scalars().groupby("step").size()
        np.testing.assert_array_equal(counts.to_numpy(), [2000] * 7)
        # a disk already full when the writer opens: StoreError naming the path
        _fill(mnt)
        with pytest.raises(StoreError, match=str(mnt / "new")):
            RunWriter(mnt / "new")


@pytest.mark.timeout(120)
def test_read_only_folder_at_open(tmp_path) -> None:
    with _tmpfs(tmp_path / "mnt") as mnt:
        RunWriter(mnt / "run").close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StoreError, match=rf"{mnt / 'run'}.*(Read-only|read-only)"):
            RunWriter(mnt / "run")
        with pytest.raises(StoreError, match=str(mnt / "other")):
            RunWriter(mnt / "other")
