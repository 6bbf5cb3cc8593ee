"""One thread beside TF's for the Keras host passes that leave the step: the ratio pass that runs
while the statistics run (no spare core) and the activation probes' reads (a spare core).

Not the store's writer thread: that one also commits the store's transactions, and a job queued
behind a slow commit (a network file system) would make the step wait for the disk. Jobs run one
at a time in the order handed over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["HostWorker"]

T = TypeVar("T")


class HostWorker:
    """Runs jobs on one thread of its own, started on the first job; :meth:`wait` blocks until
    every job handed over has run and raises the first error one of them raised."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[Any] | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # TF may call from more than one of its threads

    def run_soon(self, job: Callable[[], Any]) -> None:
        """Run ``job`` after the jobs handed over before it, and return at once (its error is
        raised by :meth:`wait`)."""
        self._hand_over(self._guarded, job)

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` after the jobs handed over before it; its result (or error) is the future's."""
        return self._hand_over(job)

    def _hand_over(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="bbdecoder-host")
            future = self._pool.submit(fn, *args)
            self._last = future
        return future

    def _guarded(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as error:  # raised by the next wait()
            if self._error is None:
                self._error = error

    def wait(self) -> None:
        """Block until every job handed over has run; raise the first error of one."""
        with self._lock:
            last = self._last
        if last is not None:
            futures.wait([last])  # one thread, jobs in order: the earlier ones are done too
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Run what is queued, stop the thread (idempotent). Errors of the jobs are dropped: a job
        not waited for belongs to an epoch that never ends (an abort, a close mid-epoch), whose
        probe state is never read."""
        with self._lock:
            pool, self._pool, self._last = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._error = None
