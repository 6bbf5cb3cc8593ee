"""RunWriter: batched, transactional writes to the run store (see :mod:`bbdecoder.store.schema`)."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from bbdecoder.store.schema import DB_FILENAME, DDL, SCHEMA_VERSION, StoreError

ScalarRow = tuple[int, int, int, int, float]
"""``(step, epoch, series_id, stat_id, value)``."""


def db_path(save_path: str | Path) -> Path:
    """The store file inside ``save_path`` (``save_path`` itself when it names a ``.sqlite`` file)."""
    path = Path(save_path)
    return path if path.suffix in {".sqlite", ".db"} else path / DB_FILENAME


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the store with the settings both sides rely on (WAL, busy timeout)."""
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        conn.execute("PRAGMA query_only = 1")
    return conn


class RunWriter:
    """Buffers rows in memory and writes them in one transaction per :meth:`flush`.

    WAL mode with ``synchronous=NORMAL``: a committed flush survives the process being killed
    (SIGKILL); only an operating-system crash or power loss can drop the last commits. Opening an
    existing store appends to it (steps continue after the last stored step).
    """

    def __init__(self, save_path: str | Path) -> None:
        self.path = db_path(save_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(self.path)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.executescript(DDL)
        versions = [row[0] for row in self._conn.execute("SELECT version FROM schema_version")]
        if not versions:
            self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            self.set_meta("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
        elif versions != [SCHEMA_VERSION]:
            self._conn.close()
            raise StoreError(
                f"{self.path} has schema version {versions}, this bbdecoder writes version "
                f"{SCHEMA_VERSION}; use a new save_path"
            )
        self._series: dict[tuple[int, str], int] = {
            (layer_id, param): sid
            for sid, layer_id, param in self._conn.execute("SELECT series_id, layer_id, param FROM series")
        }
        self._stats: dict[str, int] = {
            name: sid for sid, name in self._conn.execute("SELECT stat_id, name FROM stat_names")
        }
        self._steps: list[tuple[int, int, float, float | None]] = []
        self._scalars: list[ScalarRow] = []
        self._epoch_scalars: list[tuple[int, int, int, str, float]] = []
        self._histograms: list[tuple[int, int, int, str, float, float, int, bytes]] = []
        self._events: list[tuple[int | None, int | None, float, str, int | None, str | None, str, str]] = []
        self.closed = False

    # -- identifiers --------------------------------------------------------------------------
    def next_step(self) -> int:
        """The first step number not yet stored (0 for a new store)."""
        row = self._conn.execute("SELECT MAX(step) FROM steps").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def last_epoch(self) -> int | None:
        row = self._conn.execute("SELECT MAX(epoch) FROM steps").fetchone()
        return None if row[0] is None else int(row[0])

    def has_histograms(self) -> bool:
        if self._histograms:
            return True
        return self._conn.execute("SELECT 1 FROM histograms LIMIT 1").fetchone() is not None

    def series_id(self, layer_id: int, param: str) -> int:
        key = (layer_id, param)
        if key not in self._series:
            cur = self._conn.execute("INSERT INTO series (layer_id, param) VALUES (?, ?)", key)
            self._series[key] = int(cur.lastrowid or 0)
        return self._series[key]

    def stat_id(self, name: str) -> int:
        if name not in self._stats:
            cur = self._conn.execute("INSERT INTO stat_names (name) VALUES (?)", (name,))
            self._stats[name] = int(cur.lastrowid or 0)
        return self._stats[name]

    # -- buffered rows ------------------------------------------------------------------------
    def set_layers(self, rows: list[tuple[int, str, str, int, str | None]]) -> None:
        """Replace the layer table: ``(layer_id, name, type, params, output_shape)`` rows."""
        with self._transaction():
            self._conn.execute("DELETE FROM layers")
            self._conn.executemany("INSERT INTO layers VALUES (?, ?, ?, ?, ?)", rows)

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def set_artifact(self, name: str, kind: str, content: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?)", (name, kind, content))

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
        """Store one binary record now (its own transaction); returns its ``blob_id``."""
        with self._transaction():
            cur = self._conn.execute(
                "INSERT INTO blobs (step, epoch, time, kind, name, layer_id, meta, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (step, epoch, time.time(), kind, name, layer_id, json.dumps(meta or {}, default=str), data),
            )
        return int(cur.lastrowid or 0)

    def add_array(self, kind: str, name: str, array: np.ndarray, **where: Any) -> int:
        """Store an array (``numpy.save`` format; shape and dtype also go into ``meta``)."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        meta = {"shape": list(array.shape), "dtype": str(array.dtype), **where.pop("meta", {})}
        return self.add_blob(kind, name, buffer.getvalue(), meta=meta, **where)

    def add_step(self, step: int, epoch: int, loss: float | None) -> None:
        self._steps.append((step, epoch, time.time(), loss))

    def add_scalars(self, rows: list[ScalarRow]) -> None:
        self._scalars.extend(rows)

    def add_epoch_scalars(self, rows: list[tuple[int, int, int, str, float]]) -> None:
        self._epoch_scalars.extend(rows)

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
    def pending(self) -> int:
        """Rows buffered and not yet written."""
        return sum(
            len(x) for x in (self._steps, self._scalars, self._epoch_scalars, self._histograms, self._events)
        )

    def flush(self) -> None:
        """Write every buffered row in one transaction (all or nothing)."""
        if not self.pending:
            return
        with self._transaction():
            c = self._conn
            c.executemany("INSERT INTO steps VALUES (?, ?, ?, ?)", self._steps)
            c.executemany("INSERT INTO scalars VALUES (?, ?, ?, ?, ?)", self._scalars)
            c.executemany("INSERT INTO epoch_scalars VALUES (?, ?, ?, ?, ?)", self._epoch_scalars)
            c.executemany("INSERT INTO histograms VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._histograms)
            c.executemany(
                "INSERT INTO events (step, epoch, time, kind, layer_id, param, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                self._events,
            )
        for buffer in (self._steps, self._scalars, self._epoch_scalars, self._histograms, self._events):
            buffer.clear()

    def relabel_epoch(self, first_step: int, last_step: int, epoch: int) -> None:
        """Give the stored steps ``first_step..last_step`` the epoch number ``epoch``."""
        self.flush()
        with self._transaction():
            for table in ("steps", "scalars", "histograms", "events"):
                self._conn.execute(
                    f"UPDATE {table} SET epoch = ? WHERE step BETWEEN ? AND ?", (epoch, first_step, last_step)
                )

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self._conn.close()
        self.closed = True

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
