"""RunWriter's opening of the store file, and what it reads back from it.

Opening checks that the file is a bbdecoder store of this schema version (or makes a new one),
loads the identifiers already allocated, and starts the buffers; afterwards the counters
(:meth:`~StoreOpening.next_step`, :meth:`~StoreOpening.last_epoch`) and the identifiers answer from
the stored rows and the buffered ones together.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from bbdecoder.store import vocabulary as V
from bbdecoder.store.buffers import _ENVIRONMENT_ERRORS
from bbdecoder.store.connection import connect_readwrite, foreign_message, store_kind
from bbdecoder.store.schema import APPLICATION_ID, DDL, SCHEMA_VERSION, StoreError
from bbdecoder.store.sql_writes import SqlWrites

__all__ = ["StoreOpening", "connect"]


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the store file: read-only (works without write access to the folder) or read-write."""
    from bbdecoder.store.connection import connect_readonly

    return connect_readonly(path) if readonly else connect_readwrite(path)


class StoreOpening(SqlWrites):
    """How a :class:`~bbdecoder.store.writer.RunWriter` opens its store and reads back from it."""

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
        self._init_buffers()

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
