"""ThreadedRunWriter: the same store as RunWriter, flushes on the writer thread, at most one in
flight, the writer thread's warnings and errors raised on the training thread, close() drains."""

from __future__ import annotations

import sqlite3
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from bbdecoder.store import RunWriter, StoreWriteWarning, open_run
from bbdecoder.store.background import ThreadedRunWriter


def _fill(writer: RunWriter, steps: range) -> None:
    writer.set_layers([(0, "fc", "Linear", 12, "[1, 3]")])
    sid = writer.series_id(0, "fc.weight")
    mean = writer.stat_id("mean")
    for step in steps:
        writer.add_step(step, 0, float(step))
        writer.add_scalars([(step, 0, sid, mean, step * 0.5)])
        writer.add_event("note", f"step {step}", step=step, epoch=0)
        writer.flush()
    writer.add_histogram(steps[-1], 0, sid, "weight", -1.0, 1.0, np.array([1, 0, 5, 2]))
    writer.add_epoch_scalars([(0, sid, mean, "mean", 0.5)])
    writer.flush()


def test_same_store_as_the_plain_writer(tmp_path: Path) -> None:
    plain, threaded = RunWriter(tmp_path / "a"), ThreadedRunWriter(tmp_path / "b")
    for w in (plain, threaded):
        _fill(w, range(20))
        w.close()
    with open_run(tmp_path / "a") as a, open_run(tmp_path / "b") as b:
        assert a.integrity_check() == b.integrity_check() == "ok"
        assert a.scalars().equals(b.scalars())
        assert a.steps().drop(columns="time").equals(b.steps().drop(columns="time"))
        assert a.events()["message"].tolist() == b.events()["message"].tolist()
        assert a.epoch_scalars().equals(b.epoch_scalars())


def test_flush_runs_on_the_writer_thread_one_at_a_time(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path)
    _fill(writer, range(2))
    writer.wait()
    threads: list[str] = []
    release = threading.Event()
    original = RunWriter.flush

    def slow_flush(self: RunWriter) -> None:
        threads.append(threading.current_thread().name)
        release.wait(timeout=30)
        original(self)

    RunWriter.flush = slow_flush  # type: ignore[method-assign]
    try:
        writer.add_step(5, 0, None)
        writer.flush()  # returns while the writer thread is held inside the flush
        assert not writer._idle.is_set()  # (the buffers are locked by the flush meanwhile)
        second = threading.Thread(target=lambda: (writer.flush(), threads.append("second returned")))
        second.start()
        second.join(timeout=0.5)
        assert second.is_alive()  # a second flush waits for the first: never two in flight
        release.set()
        second.join(timeout=30)
        writer.wait()
    finally:
        RunWriter.flush = original  # type: ignore[method-assign]
    assert threads[0] == "bbdecoder-store-writer" and "second returned" in threads
    assert writer.pending == 0
    writer.close()
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 5]


def test_a_bug_in_a_flush_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path)
    _fill(writer, range(3))
    writer.add_step(1, 0, None)  # stored already: the flush's transaction fails and rolls back
    writer.flush()  # returns: the error happens on the writer thread
    with pytest.raises(sqlite3.IntegrityError):
        writer.wait()
    writer.wait()  # raised once
    with pytest.raises(sqlite3.IntegrityError):
        writer.close()  # the bad rows are still buffered: as RunWriter.close, it says so and closes
    assert writer.closed
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2]


class _FailingConnection:
    """Every statement fails as a full disk would, until ``ok`` is set."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn, self.ok = conn, False

    def execute(self, sql: str, *args: object) -> object:
        if not self.ok and sql.startswith("BEGIN"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


def test_write_failure_warnings_are_raised_on_the_training_thread_and_close_drains(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path, retry_seconds=0)
    _fill(writer, range(2))
    writer.wait()
    disk = writer._conn = _FailingConnection(writer._conn)
    writer.add_step(2, 0, 2.0)
    writer.flush()
    with pytest.warns(StoreWriteWarning, match="disk is full"):
        writer.wait()
    assert writer.failing and writer.pending > 0  # kept in memory
    disk.ok = True
    writer.add_step(3, 0, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        writer.flush()  # the recovery happens on the writer thread
    with pytest.warns(StoreWriteWarning, match="writable again"):
        writer.close()  # drains: the recovery's warning comes out here
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3]


def test_close_writes_what_is_buffered_and_stops_the_thread(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path)
    _fill(writer, range(4))
    writer.add_step(4, 0, None)  # buffered, never flushed
    thread = writer._thread
    writer.close()
    assert thread is not None and not thread.is_alive()
    writer.close()  # idempotent
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3, 4]


def test_a_reader_in_the_same_process_sees_every_step_handed_to_the_writer(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path)
    _fill(writer, range(2))
    writer.wait()  # the fill's own flush is committed before flushes are held back
    release = threading.Event()
    original = RunWriter.flush

    def slow_flush(self: RunWriter) -> None:
        release.wait(timeout=30)
        original(self)

    RunWriter.flush = slow_flush  # type: ignore[method-assign]
    try:
        writer.add_step(2, 0, None)
        writer.flush()  # held on the writer thread until released
        threading.Timer(0.3, release.set).start()
        with open_run(tmp_path) as run:  # waits for the commit in flight
            assert release.is_set()
            assert run.steps()["step"].tolist() == [0, 1, 2]
    finally:
        RunWriter.flush = original  # type: ignore[method-assign]
        release.set()
    writer.close()


def test_a_job_runs_on_the_writer_thread_before_its_flush_and_warns_on_the_training_thread(
    tmp_path: Path,
) -> None:
    writer = ThreadedRunWriter(tmp_path)
    _fill(writer, range(2))
    seen: list[str] = []

    def job() -> None:
        seen.append(threading.current_thread().name)
        writer.add_step(2, 0, 2.0)  # the job's own calls do not wait for the thread they run on
        writer.warn("from the job", UserWarning)

    writer.run_then_flush(job)
    with pytest.warns(UserWarning, match="from the job"):
        writer.wait()
    assert seen == ["bbdecoder-store-writer"]
    writer.run_then_flush(lambda: writer.add_step(3, 0, 3.0), flush=False)
    writer.wait()
    assert not writer.pending  # wait() commits a held job's rows too
    writer.close()
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3]


def test_close_called_inside_a_job_closes_after_it(tmp_path: Path) -> None:
    """A dropped analyzer's finalizer can run in a garbage collection on the writer thread: the
    thread cannot join itself, so it closes the store when the job is over."""
    writer = ThreadedRunWriter(tmp_path)
    _fill(writer, range(2))
    thread = writer._thread
    writer.run_then_flush(lambda: (writer.add_step(2, 0, 2.0), writer.close()))
    assert thread is not None
    thread.join(timeout=10)
    assert not thread.is_alive() and writer.closed
    writer.close()  # a no-op now
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2]


def test_run_soon_queues_behind_running_work_without_waiting(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path / "run")
    release, order = threading.Event(), []

    def first() -> None:
        release.wait(30)
        order.append("first")

    writer.run_then_flush(first)
    writer.run_soon(lambda: order.append("second"))
    assert order == []  # returned while the first job still waits: no wait for it
    release.set()
    writer.wait()  # waits for both, not only the first
    assert order == ["first", "second"]

    ran = threading.Event()
    with writer._mutex:  # the store's lock held here: a job that does not take it still runs
        writer.run_soon(ran.set)
        assert ran.wait(30)
    writer.wait()

    def broken() -> None:
        raise ZeroDivisionError("in the job")

    writer.run_soon(broken)
    with pytest.raises(ZeroDivisionError, match="in the job"):
        writer.wait()
    writer.close()
    here = []
    writer.run_soon(lambda: here.append(threading.current_thread()))  # closed: runs on this thread
    assert here == [threading.current_thread()]


def test_a_job_without_a_flush_is_held_until_the_next_flush_wait_or_close(tmp_path: Path) -> None:
    """``run_then_flush(job, flush=False)`` keeps the job on the calling thread (the writer thread
    is not woken); the next flush hands the held jobs over first, in order, in one request; so do
    :meth:`wait`, :meth:`flush` and :meth:`close`."""
    writer = ThreadedRunWriter(tmp_path / "run")
    _fill(writer, range(1))
    writer.wait()
    sid, mean = writer.series_id(0, "fc.weight"), writer.stat_id("mean")
    ran: list[tuple[int, bool]] = []

    def job(step: int):  # type: ignore[no-untyped-def]
        def run() -> None:
            ran.append((step, threading.current_thread() is threading.main_thread()))
            writer.add_step(step, 0, float(step))
            writer.add_scalars([(step, 0, sid, mean, step * 0.5)])

        return run

    writer.run_then_flush(job(1), flush=False)
    writer.run_then_flush(job(2), flush=False)
    assert ran == [] and writer._outstanding == 0  # held here: nothing handed over
    writer.run_then_flush(job(3))
    writer.wait()
    assert ran == [(1, False), (2, False), (3, False)]  # in order, on the writer thread
    with open_run(tmp_path / "run") as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3]  # committed by the one flush

    writer.run_then_flush(job(4), flush=False)
    writer.wait()  # runs the held job and commits its rows
    assert ran[-1] == (4, False) and not writer.pending
    writer.run_then_flush(job(5), flush=False)
    writer.flush()
    writer.wait()
    assert ran[-1] == (5, False)
    with open_run(tmp_path / "run") as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3, 4, 5]
    writer.run_then_flush(job(6), flush=False)
    writer.close()
    with open_run(tmp_path / "run") as run:
        assert run.steps()["step"].tolist() == list(range(7))
        sc = run.scalars()
        assert sc[sc.stat == "mean"].set_index("step")["value"].to_dict() == {s: s * 0.5 for s in range(7)}


def test_held_jobs_survive_an_error_of_the_writer_thread(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path / "run")
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in a job")

    for flush in (False, True):
        ran.clear()
        writer.run_then_flush(broken)
        with pytest.raises(RuntimeError, match="a bug in a job"):
            writer.run_then_flush(lambda: ran.append("the step after"), flush=flush)
        assert ran == []  # raised before it was handed over: the job is held
        writer.wait()
        assert ran == ["the step after"]
    writer.close()


def test_a_held_job_that_fails_does_not_stop_the_ones_after_it(tmp_path: Path) -> None:
    writer = ThreadedRunWriter(tmp_path / "run")
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("step 1's bookkeeping failed")

    writer.run_then_flush(lambda: ran.append(0), flush=False)
    writer.run_then_flush(broken, flush=False)
    writer.run_then_flush(lambda: ran.append(2))
    with pytest.raises(RuntimeError, match="step 1's bookkeeping failed"):
        writer.wait()
    assert ran == [0, 2]
    writer.close()
