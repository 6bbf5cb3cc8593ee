"""RunWriter: batched, transactional writes to the run store (see :mod:`bbdecoder.store.schema`).

The class composes its parts, one module each: :mod:`bbdecoder.store.opening` (opening and
validating the store file, the counters and identifiers read back), :mod:`bbdecoder.store.buffers`
(the bounded in-memory buffer and the failure policy) and :mod:`bbdecoder.store.sql_writes` (the
transactions and the WAL checkpoints). This module keeps the writer's public calls and its lifetime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bbdecoder.store.buffers import ScalarRow, table_rows
from bbdecoder.store.connection import db_path
from bbdecoder.store.lock import StoreLock, hint
from bbdecoder.store.opening import StoreOpening, connect
from bbdecoder.store.schema import StoreError, StoreWriteWarning

__all__ = ["RunWriter", "ScalarRow", "connect", "db_path", "table_rows"]


class RunWriter(StoreOpening):
    """Buffers rows in memory and writes them in one transaction per :meth:`flush`.

    One writer per store: opening takes an OS lock on ``<store>.lock`` (released when the writer
    closes or its process dies, also on SIGKILL); a second writer, in another process or this one,
    is refused with :class:`~bbdecoder.store.StoreLockedError` naming the holder. An SQLite file
    that is not a bbdecoder store is refused and left untouched. Opening an existing store appends
    to it (steps continue after the last stored step).

    WAL mode with ``synchronous=NORMAL``: a committed flush survives the process being killed
    (SIGKILL); only an operating-system crash or power loss can drop the last commits. The WAL is
    checkpointed into ``run.sqlite`` at every epoch end (a flush that writes epoch aggregates), by
    :meth:`checkpoint` and at :meth:`close`.

    Write failures after opening (full disk, folder made read-only) never raise: a
    :class:`~bbdecoder.store.StoreWriteWarning` names the path once, rows stay buffered (at most
    ``max_buffer_bytes``, about; beyond it the oldest buffered steps are dropped whole and a
    ``store_gap`` event records them) and are written by the first flush that succeeds (retried at
    most every ``retry_seconds``). Failures at opening raise :class:`~bbdecoder.store.StoreError`
    with the path.
    """

    def __init__(
        self, save_path: str | Path, *, max_buffer_bytes: int = 256 * 2**20, retry_seconds: float = 5.0
    ) -> None:
        self.path = db_path(save_path)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self._watchers_lock = threading.RLock()
        self.retry_seconds = float(retry_seconds)
        self.closed = True  # until the store is open
        self._conn: Any = None
        self._lock: StoreLock | None = None
        if self.path.is_dir():
            raise StoreError(
                f"{self.path} is a directory, not a run store file: pass its parent folder as save_path"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the run store folder {self.path.parent}: {err}{hint(err)}"
            ) from err
        self._pid = os.getpid()
        self._lock = StoreLock(self.path)
        try:
            self._open()
        except BaseException as err:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._lock.release()
            if isinstance(err, StoreError) or not isinstance(err, sqlite3.Error | OSError):
                raise
            fix = hint(err) if isinstance(err, OSError) else ""
            if "full" in str(err):
                fix = "; free disk space or pass a save_path on another disk"
            elif "readonly" in str(err) or "unable to open" in str(err):
                fix = "; pass a save_path in a writable folder (reading needs no write access)"
            raise StoreError(f"cannot open the run store {self.path} for writing: {err}{fix}") from err
        self.closed = False

    # -- buffered rows ------------------------------------------------------------------------
    def set_layers(self, rows: list[tuple[int, str, str, int, str | None]]) -> None:
        """Replace the layer table: ``(layer_id, name, type, params, output_shape)`` rows (written
        by the next flush)."""
        self._layers = [tuple(r) for r in rows]  # type: ignore[misc]

    def set_meta(self, key: str, value: str) -> None:
        self._meta[key] = value

    def set_artifact(self, name: str, kind: str, content: str) -> None:
        self._artifacts[name] = (kind, content)

    def add_blob(
        self,
        kind: str,
        name: str,
        data: bytes,
        *,
        step: int | None = None,
        epoch: int | None = None,
        layer_id: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Store one binary record now (its own transaction, with no buffered step rows); returns its
        ``blob_id``. When the store cannot be written, it is kept and written later."""
        blob_id, self._next_blob = self._next_blob, self._next_blob + 1
        payload = json.dumps(meta or {}, default=str)
        self._blobs.append((blob_id, step, epoch, time.time(), kind, name, layer_id, payload, bytes(data)))
        self._write(rows=False, force=False)
        return blob_id

    def add_array(self, kind: str, name: str, array: np.ndarray, **where: Any) -> int:
        """Store an array (``numpy.save`` format; shape and dtype also go into ``meta``)."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        meta = {"shape": list(array.shape), "dtype": str(array.dtype), **where.pop("meta", {})}
        return self.add_blob(kind, name, buffer.getvalue(), meta=meta, **where)

    def add_step(self, step: int, epoch: int, loss: float | None) -> None:
        if loss is None:
            loss = self._late_losses.pop(step, None)
        self._steps.append((step, epoch, time.time(), loss))

    def set_loss(self, step: int, loss: float) -> None:
        """Set the loss of ``step``: in its buffered row, in its stored row (next flush), or in the row
        when it is added later (a deferred host copy)."""
        for i, row in enumerate(self._steps):
            if row[0] == step:
                self._steps[i] = (row[0], row[1], row[2], float(loss))
                return
        self._loss_updates.append((float(loss), int(step)))
        self._late_losses[int(step)] = float(loss)

    @property
    def watchers_lock(self) -> threading.RLock:
        """The lock that code wrapping this writer's methods (the alert engine, the live sinks)
        holds while it updates its own state, so that a job on a writer thread and a call on the
        training thread take turns."""
        return self._watchers_lock

    def add_scalars(self, rows: list[ScalarRow]) -> None:
        self._scalars.extend(rows)

    def add_step_scalars(
        self, step: int, epoch: int, series_ids: np.ndarray, stat_ids: Sequence[int], values: np.ndarray
    ) -> None:
        """Buffer one step's table: ``values`` ``(len(series_ids), len(stat_ids))``, ``values[i, j]``
        statistic ``stat_ids[j]`` of series ``series_ids[i]``. The rows go through
        :meth:`add_scalars` (whatever watches it sees them); the alert rules read the arrays."""
        self.add_scalars(table_rows(step, epoch, series_ids, stat_ids, values))

    def add_epoch_scalars(self, rows: list[tuple[int, int, int, str, float]]) -> None:
        """Buffer an epoch's aggregates; this marks an epoch end: the flush that writes them also
        checkpoints the WAL into ``run.sqlite``."""
        self._epoch_scalars.extend(rows)
        self._checkpoint_due = True

    def add_histogram(
        self, step: int, epoch: int, series_id: int, kind: str, lo: float, hi: float, counts: np.ndarray
    ) -> None:
        blob = np.ascontiguousarray(counts, dtype="<i8").tobytes()
        self._histograms.append((step, epoch, series_id, kind, lo, hi, int(counts.size), blob))

    def add_event(
        self,
        kind: str,
        message: str,
        *,
        step: int | None = None,
        epoch: int | None = None,
        layer_id: int | None = None,
        param: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        payload = json.dumps(data, default=str) if data is not None else "null"
        self._events.append((step, epoch, time.time(), kind, layer_id, param, message, payload))

    def flush(self) -> None:
        """Write every buffered row in one transaction (all or nothing). When the store cannot be
        written the rows stay buffered (see the class docstring); this never raises for that. Rows
        that are wrong themselves (a step stored twice: a bug) still raise ``sqlite3.IntegrityError``
        and roll the transaction back."""
        self._write(rows=True, force=False)

    def relabel_epoch(self, first_step: int, last_step: int, epoch: int) -> None:
        """Give the steps ``first_step..last_step`` (stored and buffered) the epoch number ``epoch``."""

        def relabel(rows: list[Any]) -> None:
            rows[:] = [
                (r[0], epoch, *r[2:]) if r[0] is not None and first_step <= r[0] <= last_step else r
                for r in rows
            ]

        for rows in (self._steps, self._scalars, self._histograms, self._events):
            relabel(rows)
        self._relabels.append((first_step, last_step, epoch))
        self.flush()

    def close(self) -> None:
        """Write what is buffered, checkpoint, close the connection and release the store. Never
        raises for a store that cannot be written (a warning says what was lost); idempotent."""
        if self.closed:
            return
        self.closed = True
        if os.getpid() != self._pid:
            return  # a forked child (a DataLoader worker): the store is its parent's, leave it alone
        try:
            self._write(rows=True, force=True)
            if self.pending:
                warnings.warn(
                    f"bbdecoder: {self.pending} buffered rows of the run store {self.path} could not be "
                    f"written before closing ({self._failing}); they are lost",
                    StoreWriteWarning,
                    stacklevel=2,
                )
            elif self._conn is not None:
                self._checkpoint_quietly()
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # a dropped writer releases its lock (the file object would too, this also closes SQLite)
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.close()
