"""RunWriter's SQL writes: the buffered rows written in one transaction, and the WAL checkpoints.

A write that fails for a reason of the environment leaves the rows buffered (see
:mod:`bbdecoder.store.buffers`); any other failure rolls the transaction back and raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from typing import Any

from bbdecoder.store.buffers import RowBuffer, _is_write_failure
from bbdecoder.store.bulk_insert import insert_rows

__all__ = ["SqlWrites"]


class SqlWrites(RowBuffer):
    """The transactions of a :class:`~bbdecoder.store.writer.RunWriter` (catalog, blobs, rows)."""

    _conn: Any
    _pid: int
    closed: bool
    retry_seconds: float

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

    def _write_catalog(self) -> None:
        c = self._conn
        # each statement only where it has rows: a step's flush usually has none of these
        if self._new_series:
            c.executemany(
                "INSERT INTO series (series_id, layer_id, param) VALUES (?, ?, ?)", self._new_series
            )
        if self._new_stats:
            c.executemany("INSERT INTO stat_names (stat_id, name) VALUES (?, ?)", self._new_stats)
        if self._meta:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(self._meta.items()))
        if self._artifacts:
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
        if self._loss_updates:
            c.executemany("UPDATE steps SET loss = ? WHERE step = ?", self._loss_updates)
        insert_rows(c, "INSERT INTO scalars VALUES", self._scalars)  # one statement per 256 rows
        insert_rows(c, "INSERT INTO epoch_scalars VALUES", self._epoch_scalars)
        insert_rows(c, "INSERT INTO histograms VALUES", self._histograms)
        if self._events:
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
