"""ThreadedRunWriter: a :class:`~bbdecoder.store.writer.RunWriter` whose flushes run on a writer thread.

The training thread only appends rows to the in-memory buffers (under a lock, never held while
waiting for the writer thread); :meth:`flush` hands
the SQLite transaction to one writer thread through a queue of size one and returns at once. The
promises of :class:`RunWriter` stay:

- **SIGKILL**: at most one flush is in flight, and the next step's first row (:meth:`add_step`)
  waits until it is committed, so a killed process loses at most the rows of the last
  ``flush_every`` steps, never part of a step (each flush is one transaction).
- **Errors**: write failures of the environment are warnings, as before; the writer thread defers
  them and the training thread raises them (``StoreWriteWarning``) at its next call. Any other
  exception of a flush (a bug, e.g. ``sqlite3.IntegrityError``) is raised in the training thread by
  the next :meth:`flush`, :meth:`add_step`, :meth:`wait` or :meth:`close`.
- :meth:`close` drains the queue, stops the thread and closes the store on the calling thread.
- :meth:`run_then_flush` hands the writer thread a job before a flush (the analyzer's bookkeeping
  of one CPU step: rows, epoch aggregates, alert rules), on the same terms: it waits for the
  previous job and flush, so a step's work overlaps the next forward and backward pass and
  nothing piles up. A job without a flush (``flush_every`` > 1) is held on the training thread
  and handed over with the next flush, so the writer thread wakes once per flush. Warnings a job
  raises (:meth:`warn`) are raised on the training thread by its next call, like the store's own.
  :meth:`after_held` puts a job of the training thread (a user's ``log()``) behind the held jobs.
- :meth:`run_soon` queues a job that does not touch the store (the update ratios measured after
  ``optimizer.step()``) behind the work already handed over, without waiting; :meth:`wait` waits
  for it too. At most two requests are outstanding.

A reader opened in the same process (:func:`~bbdecoder.store.open_run`: figures drawn during training,
the report) first waits for the open writer of its store (:func:`wait_for_writer`), so it reads
everything recorded so far. A forked child (a DataLoader worker) never waits on or writes to its
parent's store.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bbdecoder.store.schema import StoreWriteWarning
from bbdecoder.store.writer import RunWriter, ScalarRow

__all__ = ["ThreadedRunWriter", "after_held_steps", "wait_for_writer"]

_Request = tuple[Callable[[], None] | None, bool, bool]

_OPEN: weakref.WeakValueDictionary[str, ThreadedRunWriter] = weakref.WeakValueDictionary()
"""The open threaded writers of this process, by store file."""


def _key(path: Path) -> str:
    return os.path.realpath(path)


def wait_for_writer(path: Path) -> None:
    """Wait until an open :class:`ThreadedRunWriter` of this process on the store file ``path`` has
    committed every flush handed to it, so that a reader in the same process (figures drawn during
    training, the report) sees what was recorded; called on the thread that holds steps for a later
    flush (``flush_every`` > 1), it hands them over with a flush first. Its warnings and
    errors stay for the writer's own caller."""
    writer = _OPEN.get(_key(path))
    if writer is not None and os.getpid() == writer._pid:
        writer._commit_held_here()
        writer._idle.wait()


def after_held_steps(writer: Any, job: Callable[[], None]) -> None:
    """Run ``job`` (rows for the store) after the steps' bookkeeping that ``writer`` holds, where it
    is a :class:`ThreadedRunWriter` (:meth:`ThreadedRunWriter.after_held`); at once with any other
    writer. Rows added from the training thread so reach the alert rules and live sinks in step
    order, whatever ``flush_every``."""
    after_held = getattr(writer, "after_held", None)
    if after_held is None:
        job()
    else:
        after_held(job)


class ThreadedRunWriter(RunWriter):
    """:class:`RunWriter` with its flushes on a writer thread (see the module docstring)."""

    def __init__(self, save_path: str | Path, **kwargs: Any) -> None:
        self._mutex = threading.RLock()
        # (a job or None, flush after it, the job needs the store's lock); None stops the thread
        self._requests: queue.Queue[_Request | None] = queue.Queue(maxsize=2)
        self._idle = threading.Event()  # set while no request is outstanding
        self._idle.set()
        self._outstanding = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._deferred: list[tuple[str, type[Warning]]] = []
        self._close_here = False
        self._held: list[Callable[[], None]] = []  # jobs run_then_flush keeps for the next hand-over
        self._held_by: int | None = None  # the thread that holds them (the training thread)
        super().__init__(save_path, **kwargs)
        _OPEN[_key(self.path)] = self

    @property
    def watchers_lock(self) -> threading.RLock:
        """This writer's own lock: its jobs hold it already, and an alert's event takes it again,
        so a watcher holding it keeps one lock order (no deadlock)."""
        return self._mutex

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            job, flush, locked = request
            try:
                with self._mutex if locked else contextlib.nullcontext():
                    if job is not None:
                        job()
                    if flush:
                        RunWriter.flush(self)
            except BaseException as err:  # surfaced on the training thread
                self._error = err
            finally:
                del request, job  # a job may hold its analyzer: keep nothing alive while idle
                with self._count_lock:
                    self._outstanding -= 1
                    if self._outstanding == 0:
                        self._idle.set()
            if self._close_here:  # close() was called on this thread: finish it now the job is done
                with self._mutex:
                    held, self._held = self._held, []
                    for job in held:  # its analyzer was dropped: nothing will hand them over now
                        with contextlib.suppress(Exception):  # no training thread left to raise it on
                            job()
                    RunWriter.close(self)
                _OPEN.pop(_key(self.path), None)
                return

    def _on_writer_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def warn(self, message: str, category: type[Warning], stacklevel: int = 2) -> None:
        """``warnings.warn`` on the training thread: raised now there, or, from the writer thread
        (a job), by the training thread's next call to this writer."""
        if self._on_writer_thread():
            self._deferred.append((message, category))
        else:
            warnings.warn(message, category, stacklevel=stacklevel + 1)

    def _warn(self, message: str, stacklevel: int) -> None:
        self.warn(message, StoreWriteWarning, stacklevel + 1)

    def _surface(self) -> None:
        """Warnings and the error of the writer thread, raised here on the calling thread."""
        deferred, self._deferred = self._deferred, []
        for message, category in deferred:
            warnings.warn(message, category, stacklevel=4)
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _wait_idle(self) -> None:
        if self._on_writer_thread():
            return  # a job's own calls: the thread is busy with that job
        if os.getpid() == self._pid:
            if self._held and not self.closed:  # committed too: wait() promises the store has them
                self._hand_over_after_held(None, True)
            self._idle.wait()
        self._surface()

    def _hand_over_after_held(self, job: Callable[[], None] | None, flush: bool) -> None:
        """Hand over the held jobs, then ``job``, then a flush if ``flush``: one request."""
        jobs, self._held = [*self._held, *([job] if job is not None else [])], []
        self._hand_over(_in_turn(jobs) if jobs else None, flush)

    # -- the training thread ------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every job and flush handed to the writer thread is done, the held jobs of
        :meth:`run_then_flush` included and committed with a flush (a flush that failed: its
        warning or error is raised here)."""
        self._wait_idle()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (one transaction, after the held jobs) and
        return; waits only while the previous flush is still being written."""
        if self.closed or os.getpid() != self._pid:
            self._wait_idle()
            return
        self._idle.wait()
        self._surface()  # an error of the writer thread: the held jobs stay for the next call
        self._hand_over_after_held(None, True)

    def run_then_flush(self, job: Callable[[], None], flush: bool = True) -> None:
        """Run ``job`` on the writer thread, then flush; returns at once, after waiting for the
        previous job or flush. With ``flush=False`` the job is held here and handed over with the
        next flush (or :meth:`wait`, or any call that waits for the writer thread); only the first
        one after a flush waits, for that flush to commit. So with ``flush_every=k`` the writer
        thread wakes once for k steps, its Python runs from warm caches after the first step's,
        and a kill still loses at most k steps. A job must only call this writer (and what it
        owns) and :meth:`warn`; its exception is raised by the training thread's next call (a job
        whose call raises it stays held). In a forked child or on a closed writer the job runs
        here."""
        if self.closed or os.getpid() != self._pid:
            self._wait_idle()
            job()
            if flush:
                self.flush()
            return
        first = not self._held
        self._held.append(job)  # an error raised below leaves it held, for the next hand-over
        self._held_by = threading.get_ident()
        if flush or first:  # the first job after a flush waits for that flush to commit, so a
            self._idle.wait()  # kill still loses at most flush_every steps
            self._surface()
        if flush:
            self._hand_over_after_held(None, True)

    def after_held(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs :meth:`run_then_flush` holds (appended to them, handed over
        with them) or, where none is held, after those handed over and still running (as a
        request of its own), else here and now. A user's ``log()`` rows so reach the store's
        watchers (alert rules, live sinks) after the tables of the steps before them, in step
        order, whatever ``flush_every``."""
        if self.closed or os.getpid() != self._pid:
            job()
        elif self._held:
            self._held.append(job)
        elif not self._idle.is_set():  # handed-over jobs still running: after them, in turn
            self._hand_over(job, False)
        else:
            job()

    def _commit_held_here(self) -> None:
        """Hand the held jobs over with a flush, where the calling thread is the one holding them
        (another thread leaves them: only their own thread changes the held list)."""
        if self._held and self._held_by == threading.get_ident() and not self.closed:
            self._hand_over_after_held(None, True)

    def run_soon(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the writer thread after the work already handed over, and return at once
        (no wait for that work). The job must not touch the store (it runs without the store's
        lock); its exception is raised by the training thread's next call. In a forked child or on
        a closed writer it runs here."""
        if self.closed or os.getpid() != self._pid:
            job()
            return
        self._hand_over(job, False, locked=False)

    def _hand_over(self, job: Callable[[], None] | None, flush: bool, locked: bool = True) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bbdecoder-store-writer", daemon=True)
            self._thread.start()
        with self._count_lock:
            self._outstanding += 1
            self._idle.clear()
        self._requests.put((job, flush, locked))

    def add_step(self, step: int, epoch: int, loss: float | None) -> None:
        self._wait_idle()  # the previous flush is committed before a new step is buffered
        with self._mutex:
            super().add_step(step, epoch, loss)

    def checkpoint(self) -> bool:
        self._wait_idle()
        with self._mutex:
            return super().checkpoint()

    def close(self) -> None:
        if self.closed:
            return
        if self._on_writer_thread():
            # the finalizer of a dropped analyzer, run by a garbage collection inside a job: the
            # thread cannot join itself, so it closes the store once the job is over
            self._close_here = True
            return
        try:
            self._wait_idle()
        finally:
            if self._thread is not None and os.getpid() == self._pid:
                self._requests.put(None)
                self._thread.join(timeout=60)
                self._thread = None
            with self._mutex:
                super().close()
            _OPEN.pop(_key(self.path), None)
            self._surface()

    # -- buffer access under the lock ---------------------------------------------------------
    def next_step(self) -> int:
        with self._mutex:
            return super().next_step()

    def last_epoch(self) -> int | None:
        with self._mutex:
            return super().last_epoch()

    def has_histograms(self) -> bool:
        with self._mutex:
            return super().has_histograms()

    def layer_names(self) -> dict[int, str]:
        with self._mutex:
            return super().layer_names()

    def series_id(self, layer_id: int, param: str) -> int:
        with self._mutex:
            return super().series_id(layer_id, param)

    def stat_id(self, name: str) -> int:
        with self._mutex:
            return super().stat_id(name)

    def set_layers(self, rows: list[tuple[int, str, str, int, str | None]]) -> None:
        with self._mutex:
            super().set_layers(rows)

    def set_meta(self, key: str, value: str) -> None:
        with self._mutex:
            super().set_meta(key, value)

    def set_artifact(self, name: str, kind: str, content: str) -> None:
        with self._mutex:
            super().set_artifact(name, kind, content)

    def add_blob(self, kind: str, name: str, data: bytes, **where: Any) -> int:
        with self._mutex:
            return super().add_blob(kind, name, data, **where)

    def set_loss(self, step: int, loss: float) -> None:
        with self._mutex:
            super().set_loss(step, loss)

    def add_scalars(self, rows: list[ScalarRow]) -> None:
        with self._mutex:
            super().add_scalars(rows)

    def add_epoch_scalars(self, rows: list[tuple[int, int, int, str, float]]) -> None:
        with self._mutex:
            super().add_epoch_scalars(rows)

    def add_histogram(
        self, step: int, epoch: int, series_id: int, kind: str, lo: float, hi: float, counts: np.ndarray
    ) -> None:
        with self._mutex:
            super().add_histogram(step, epoch, series_id, kind, lo, hi, counts)

    def add_event(self, kind: str, message: str, **where: Any) -> None:
        with self._mutex:
            super().add_event(kind, message, **where)

    def relabel_epoch(self, first_step: int, last_step: int, epoch: int) -> None:
        self._wait_idle()  # never wait for the writer thread while holding the lock it needs
        with self._mutex:
            super().relabel_epoch(first_step, last_step, epoch)

    @property
    def pending(self) -> int:
        with self._mutex:
            return super().pending

    @property
    def failing(self) -> bool:
        with self._mutex:
            return super().failing


def _in_turn(jobs: list[Callable[[], None]]) -> Callable[[], None]:
    """One job running ``jobs`` in order (a single job as it is); a job that raises does not stop
    the ones after it (each is a step of its own), and the first error is raised at the end."""
    if len(jobs) == 1:
        return jobs[0]

    def run() -> None:
        first: BaseException | None = None
        for job in jobs:
            try:
                job()
            except Exception as err:
                first = first or err
        if first is not None:
            raise first

    return run
