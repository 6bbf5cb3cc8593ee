"""RunWriter: batched, transactional writes to the run store (see :mod:`bbdecoder.store.schema`)."""

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
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from bbdecoder.store import vocabulary as V
from bbdecoder.store.bulk_insert import insert_rows
from bbdecoder.store.connection import connect_readwrite, db_path, foreign_message, store_kind
from bbdecoder.store.lock import StoreLock, hint
from bbdecoder.store.schema import APPLICATION_ID, DDL, SCHEMA_VERSION, StoreError, StoreWriteWarning

__all__ = ["RunWriter", "ScalarRow", "connect", "db_path", "table_rows"]

ScalarRow = tuple[int, int, int, int, float]
"""``(step, epoch, series_id, stat_id, value)``."""


def table_rows(
    step: int, epoch: int, series_ids: np.ndarray, stat_ids: Sequence[int], values: np.ndarray
) -> list[ScalarRow]:
    """The rows of one step's table ``values[i, j]`` (statistic ``stat_ids[j]`` of series
    ``series_ids[i]``), series by series."""
    n, k = values.shape
    sids = np.repeat(np.asarray(series_ids, dtype=np.int64), k).tolist()
    flat = np.asarray(values, dtype=np.float64).ravel().tolist()
    return list(zip(repeat(step), repeat(epoch), sids, list(stat_ids) * n, flat, strict=False))


_ROW_BYTES = 120  # a rough size of one buffered row tuple, for the memory bound
_ENVIRONMENT_ERRORS = (sqlite3.OperationalError, OSError)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the store file: read-only (works without write access to the folder) or read-write."""
    from bbdecoder.store.connection import connect_readonly

    return connect_readonly(path) if readonly else connect_readwrite(path)


def _is_write_failure(err: BaseException) -> bool:
    """A failure of the environment (full disk, read-only or vanished folder, I/O error, locked
    file), not of the rows: the rows are kept and written later."""
    return isinstance(err, _ENVIRONMENT_ERRORS) or type(err) is sqlite3.DatabaseError


class RunWriter:
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

    def _open(self) -> None:
        existed = self.path.exists() and self.path.stat().st_size > 0
        self._conn = conn = connect_readwrite(self.path)
        try:
            kind = store_kind(conn) if existed else "empty"
        except sqlite3.DatabaseError as err:
            if type(err) is not sqlite3.DatabaseError:
                raise
            raise StoreError(
                f"{self.path} is not an SQLite database ({err}); it was left untouched. Pass a save_path "
                "of its own (a new or empty folder) to the Analyzer"
            ) from err
        if kind == "foreign":
            raise StoreError(foreign_message(self.path, conn))
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        with self._transaction():
            for statement in DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
            if not versions:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('created', ?)",
                    (time.strftime("%Y-%m-%dT%H:%M:%S"),),
                )
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if versions and versions != [SCHEMA_VERSION]:
            raise StoreError(
                f"{self.path} has schema version {versions}, this bbdecoder writes version "
                f"{SCHEMA_VERSION}; use a new save_path"
            )
        self._series: dict[tuple[int, str], int] = {
            (layer_id, param): sid
            for sid, layer_id, param in conn.execute("SELECT series_id, layer_id, param FROM series")
        }
        self._stats: dict[str, int] = {
            name: sid for sid, name in conn.execute("SELECT stat_id, name FROM stat_names")
        }
        self._next_blob = 1 + int(
            conn.execute(
                "SELECT MAX(COALESCE((SELECT MAX(blob_id) FROM blobs), 0), "
                "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'blobs'), 0))"
            ).fetchone()[0]
        )
        # catalog rows (always safe to write) and data rows, all written by the next successful flush
        self._new_series: list[tuple[int, int, str]] = []
        self._new_stats: list[tuple[int, str]] = []
        self._layers: list[tuple[int, str, str, int, str | None]] | None = None
        self._meta: dict[str, str] = {}
        self._artifacts: dict[str, tuple[str, str]] = {}
        self._relabels: list[tuple[int, int, int]] = []
        self._steps: list[tuple[int, int, float, float | None]] = []
        self._loss_updates: list[tuple[float, int]] = []  # (loss, step) of steps already written
        self._late_losses: dict[int, float] = {}  # losses given before their step row was buffered
        self._scalars: list[ScalarRow] = []
        self._epoch_scalars: list[tuple[int, int, int, str, float]] = []
        self._histograms: list[tuple[int, int, int, str, float, float, int, bytes]] = []
        self._events: list[tuple[int | None, int | None, float, str, int | None, str | None, str, str]] = []
        self._blobs: list[tuple[int, int | None, int | None, float, str, str, int | None, str, bytes]] = []
        self._failing: BaseException | None = None
        self._failed_at = 0.0
        self._warned_drop = False
        self._dropped_steps: list[int] = []
        self._checkpoint_due = False

    # -- identifiers --------------------------------------------------------------------------
    def _stored(self, sql: str) -> Any:
        try:
            row = self._conn.execute(sql).fetchone()
        except _ENVIRONMENT_ERRORS:
            return None  # an unreadable store: the buffer alone answers
        return None if row is None else row[0]

    def next_step(self) -> int:
        """The first step number not yet stored or buffered, nor run by a monitor that skipped it
        (``every > 1``: :data:`~bbdecoder.store.vocabulary.META_NEXT_STEP`); 0 for a new store."""
        steps = [
            s + 1
            for s in (self._stored("SELECT MAX(step) FROM steps"), *(r[0] for r in self._steps))
            if s is not None
        ]
        ran = self._counter(V.META_NEXT_STEP)
        return int(max([*steps, *([] if ran is None else [ran])], default=0))

    def last_epoch(self) -> int | None:
        """The epoch of the last stored or buffered step, or the last epoch a monitor ended
        (:data:`~bbdecoder.store.vocabulary.META_LAST_EPOCH`); ``None`` for a new store."""
        epochs = [
            e
            for e in (self._stored("SELECT MAX(epoch) FROM steps"), *(r[1] for r in self._steps))
            if e is not None
        ]
        ended = self._counter(V.META_LAST_EPOCH)
        epochs += [] if ended is None else [ended]
        return int(max(epochs)) if epochs else None

    def _counter(self, key: str) -> int | None:
        """An integer meta value, buffered or stored (``None``: neither, or not an integer: the
        rows alone then answer)."""
        value = self._meta.get(key)
        if value is None:
            try:
                row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            except _ENVIRONMENT_ERRORS:
                return None
            value = None if row is None else row[0]
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None

    def has_histograms(self) -> bool:
        return bool(self._histograms) or self._stored("SELECT 1 FROM histograms LIMIT 1") is not None

    def layer_names(self) -> dict[int, str]:
        """``{layer_id: name}`` of the layer table (the buffered one when :meth:`set_layers` was
        called since the last flush; empty when the stored one cannot be read)."""
        if self._layers is not None:
            return {row[0]: row[1] for row in self._layers}
        try:
            return dict(self._conn.execute("SELECT layer_id, name FROM layers").fetchall())
        except _ENVIRONMENT_ERRORS:
            return {}

    def series_id(self, layer_id: int, param: str) -> int:
        """The ID of the series ``(layer_id, param)``, allocated here (this is the only writer)."""
        key = (int(layer_id), param)
        if key not in self._series:
            self._series[key] = sid = max(self._series.values(), default=0) + 1
            self._new_series.append((sid, *key))
        return self._series[key]

    def stat_id(self, name: str) -> int:
        if name not in self._stats:
            self._stats[name] = sid = max(self._stats.values(), default=0) + 1
            self._new_stats.append((sid, name))
        return self._stats[name]

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

    @property
    def _data_buffers(self) -> tuple[list[Any], ...]:
        return (
            self._steps,
            self._scalars,
            self._epoch_scalars,
            self._histograms,
            self._events,
            self._loss_updates,
        )

    @property
    def pending(self) -> int:
        """Rows (and blobs) buffered and not yet written."""
        catalog = len(self._new_series) + len(self._new_stats) + len(self._meta) + len(self._artifacts)
        catalog += len(self._relabels) + (self._layers is not None)
        return catalog + len(self._blobs) + sum(len(x) for x in self._data_buffers)

    @property
    def failing(self) -> bool:
        """True while the store cannot be written (rows are being kept in memory)."""
        return self._failing is not None

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

    def checkpoint(self) -> bool:
        """Copy the WAL's committed pages into ``run.sqlite`` now (SQLite's passive checkpoint: it
        never waits for readers). Returns True when ``run.sqlite`` alone holds every commit (False
        when a reader's open snapshot kept some pages in the WAL, or the write failed)."""
        if self.closed or self._conn is None:
            return False
        try:
            busy, log, done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return False
        return not busy and log == done

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

    # -- writing ------------------------------------------------------------------------------
    def _checkpoint_quietly(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _write(self, *, rows: bool, force: bool) -> None:
        if self._conn is None or os.getpid() != self._pid:
            return
        data = rows and (any(self._data_buffers) or bool(self._relabels or self._dropped_steps))
        if not (data or self._blobs or self._catalog_pending()):
            if rows and self._checkpoint_due and self._failing is None:
                self._checkpoint_due = False
                self._checkpoint_quietly()
            return
        if (
            self._failing is not None
            and not force
            and time.monotonic() - self._failed_at < self.retry_seconds
        ):
            self._bound_buffer()
            return
        epoch_end = rows and self._checkpoint_due
        try:
            with self._transaction():
                self._write_catalog()
                if self._blobs:
                    self._conn.executemany(
                        "INSERT INTO blobs (blob_id, step, epoch, time, kind, name, layer_id, meta, data) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        self._blobs,
                    )
                if rows:
                    self._write_rows()
        except BaseException as err:
            if not _is_write_failure(err):
                raise
            self._failed(err)
            return
        self._written(rows)
        if epoch_end:
            self._checkpoint_due = False
            self._checkpoint_quietly()

    def _catalog_pending(self) -> bool:
        return bool(
            self._new_series or self._new_stats or self._meta or self._artifacts or self._layers is not None
        )

    def _write_catalog(self) -> None:
        c = self._conn
        c.executemany("INSERT INTO series (series_id, layer_id, param) VALUES (?, ?, ?)", self._new_series)
        c.executemany("INSERT INTO stat_names (stat_id, name) VALUES (?, ?)", self._new_stats)
        c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(self._meta.items()))
        c.executemany(
            "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)",
            [(n, k, v) for n, (k, v) in self._artifacts.items()],
        )
        if self._layers is not None:
            c.execute("DELETE FROM layers")
            c.executemany("INSERT INTO layers VALUES (?, ?, ?, ?, ?)", self._layers)

    def _write_rows(self) -> None:
        c = self._conn
        for first, last, epoch in self._relabels:
            for table in ("steps", "scalars", "histograms", "events"):
                c.execute(f"UPDATE {table} SET epoch = ? WHERE step BETWEEN ? AND ?", (epoch, first, last))
        insert_rows(c, "INSERT INTO steps VALUES", self._steps)
        c.executemany("UPDATE steps SET loss = ? WHERE step = ?", self._loss_updates)
        insert_rows(c, "INSERT INTO scalars VALUES", self._scalars)  # one statement per 256 rows
        insert_rows(c, "INSERT INTO epoch_scalars VALUES", self._epoch_scalars)
        insert_rows(c, "INSERT INTO histograms VALUES", self._histograms)
        c.executemany(
            "INSERT INTO events (step, epoch, time, kind, layer_id, param, message, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            self._events,
        )
        if self._dropped_steps:
            lo, hi, n = min(self._dropped_steps), max(self._dropped_steps), len(self._dropped_steps)
            message = f"{n} steps between {lo} and {hi} were not stored: the run store could not be written"
            c.execute(
                "INSERT INTO events (step, epoch, time, kind, message, data) "
                "VALUES (?, NULL, ?, 'store_gap', ?, ?)",
                (lo, time.time(), message, json.dumps({"steps": sorted(self._dropped_steps)})),
            )

    def _written(self, rows: bool) -> None:
        if self._failing is not None:
            self._warn(
                f"bbdecoder: the run store {self.path} is writable again; the buffered rows were written",
                stacklevel=4,
            )
            self._failing, self._warned_drop = None, False
        self._new_series.clear()
        self._new_stats.clear()
        self._meta.clear()
        self._artifacts.clear()
        self._layers = None
        self._blobs.clear()
        if not rows:
            return
        self._relabels.clear()
        self._dropped_steps.clear()
        for buffer in self._data_buffers:
            buffer.clear()

    def _failed(self, err: BaseException) -> None:
        first = self._failing is None
        self._failing, self._failed_at = err, time.monotonic()
        if first:
            self._warn(
                f"bbdecoder: cannot write the run store {self.path} ({err}); training goes on, the "
                f"rows are kept in memory (up to about {self.max_buffer_bytes // 2**20} MiB) and written "
                "when the store is writable again (free disk space, or make the folder writable)",
                stacklevel=4,
            )
        self._bound_buffer()

    def _buffer_bytes(self) -> int:
        rows = sum(len(x) for x in self._data_buffers)
        return (
            rows * _ROW_BYTES
            + sum(len(b[-1]) for b in self._blobs)
            + sum(len(h[-1]) for h in self._histograms)
        )

    def _bound_buffer(self) -> None:
        """Drop the oldest buffered steps (whole: their step row, scalars, histograms and events) and
        the oldest blobs until the buffer is within ``max_buffer_bytes``."""
        while self._buffer_bytes() > self.max_buffer_bytes:
            if self._blobs:
                self._blobs.pop(0)
            elif self._steps:
                cut = self._steps[max(len(self._steps) // 10, 1) - 1][0]
                self._dropped_steps += [r[0] for r in self._steps if r[0] <= cut]
                self._steps[:] = [r for r in self._steps if r[0] > cut]
                self._scalars[:] = [r for r in self._scalars if r[0] > cut]
                self._histograms[:] = [r for r in self._histograms if r[0] > cut]
                self._events[:] = [r for r in self._events if r[0] is None or r[0] > cut]
            elif self._events or self._epoch_scalars:
                for buffer in (self._events, self._epoch_scalars):
                    del buffer[: max(len(buffer) // 10, 1)]
            else:
                break
            if not self._warned_drop:
                self._warned_drop = True
                self._warn(
                    f"bbdecoder: the run store {self.path} is still not writable and the buffer is full: "
                    "the oldest buffered steps are dropped (a 'store_gap' event will record them)",
                    stacklevel=5,
                )

    def _warn(self, message: str, stacklevel: int) -> None:
        """How a write failure or recovery is reported (the writer thread defers it, see
        :mod:`bbdecoder.store.background`)."""
        warnings.warn(message, StoreWriteWarning, stacklevel=stacklevel + 1)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")
