"""The Keras callback's host worker: jobs in order on one thread of its own, errors at wait()."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("tensorflow")

from bbdecoder.keras.host_worker import HostWorker


def test_jobs_run_in_order_on_one_other_thread_and_wait_sees_them_all() -> None:
    worker, seen, threads = HostWorker(), [], set()

    def job(i: int) -> None:
        time.sleep(0.002 if i % 3 == 0 else 0)  # a slow job must not let a later one overtake it
        seen.append(i)
        threads.add(threading.get_ident())

    for i in range(30):
        worker.run_soon(lambda i=i: job(i))
    worker.wait()
    assert seen == list(range(30))
    assert len(threads) == 1 and threading.get_ident() not in threads
    worker.close()


def test_wait_raises_the_first_error_once_and_later_jobs_still_run() -> None:
    worker, seen = HostWorker(), []

    def fail(message: str) -> None:
        raise ValueError(message)

    worker.run_soon(lambda: fail("first"))
    worker.run_soon(lambda: fail("second"))
    worker.run_soon(lambda: seen.append("after"))
    with pytest.raises(ValueError, match="first"):
        worker.wait()
    assert seen == ["after"]
    worker.wait()  # reported once
    worker.close()


def test_close_drains_the_queue_stops_the_thread_and_a_new_job_starts_another() -> None:
    worker, seen = HostWorker(), []
    worker.run_soon(lambda: (time.sleep(0.01), seen.append(1)))
    worker.close()
    assert seen == [1]
    assert not [t for t in threading.enumerate() if t.name.startswith("bbdecoder-host")]
    worker.close()  # idempotent
    worker.run_soon(lambda: seen.append(2))
    worker.wait()
    assert seen == [1, 2]
    worker.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("bbdecoder-host")]


def test_submit_hands_back_the_result_or_the_error_in_order_with_the_other_jobs() -> None:
    worker, seen = HostWorker(), []
    worker.run_soon(lambda: (time.sleep(0.01), seen.append("before")))
    future = worker.submit(lambda: [*seen, "computed"])
    assert future.result() == ["before", "computed"]

    def fail() -> None:
        raise KeyError("pass")

    failed = worker.submit(fail)
    with pytest.raises(KeyError, match="pass"):
        failed.result()
    worker.wait()  # a submitted job's error belongs to its future, not to wait()
    worker.close()
