"""Opening the store file: read-only for readers, and recognising what a file is before writing it."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from bbdecoder.store.schema import APPLICATION_ID, DB_FILENAME, STORE_TABLES, StoreError

BUSY_TIMEOUT_MS = 30_000


def db_path(save_path: str | Path) -> Path:
    """The store file inside ``save_path`` (``save_path`` itself when it names a ``.sqlite`` file)."""
    path = Path(save_path)
    return path if path.suffix in {".sqlite", ".db"} else path / DB_FILENAME


def _uri(path: Path, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"file:{quote(str(path.absolute()))}?{query}"


def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def connect_readwrite(path: Path) -> sqlite3.Connection:
    """A read-write connection (autocommit; transactions are explicit)."""
    conn = sqlite3.connect(
        str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    return _configure(conn)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that also works without write access to the store's folder.

    ``mode=ro`` sees a store while it is written (and a store left by a killed writer, whose
    ``-wal`` holds the last commits). In WAL mode SQLite needs a ``-shm`` file next to the store;
    when the folder is not writable and there is none, no writer can be active (it would have
    created one), so the file is opened ``immutable``. Raises :class:`StoreError` with the cause.
    """
    if not os.access(path, os.R_OK):
        raise StoreError(f"cannot read the run store {path}: permission denied")
    conn = _configure(sqlite3.connect(_uri(path, mode="ro"), uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                      isolation_level=None, check_same_thread=False))  # fmt: skip
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return conn
    except sqlite3.OperationalError as err:
        conn.close()
        first = err
    except sqlite3.DatabaseError as err:  # "file is not a database"
        conn.close()
        raise StoreError(f"{path} is not a bbdecoder run store (not an SQLite database: {err})") from err
    wal = wal_path(path)
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"cannot open the run store {path} read-only ({first}): its folder is not writable and "
            f"{wal.name} holds commits not yet in {path.name}; copy the folder to a writable place "
            "(run.sqlite with run.sqlite-wal) and open the copy"
        ) from first
    conn = _configure(sqlite3.connect(_uri(path, mode="ro", immutable="1"), uri=True, isolation_level=None,
                                      check_same_thread=False))  # fmt: skip
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as err:
        conn.close()
        raise StoreError(f"cannot open the run store {path} read-only: {first}; immutable: {err}") from err
    return conn


def store_kind(conn: sqlite3.Connection) -> str:
    """What the open database is: ``"empty"`` (no tables), ``"store"`` (a bbdecoder run store) or
    ``"foreign"`` (an SQLite database of something else). Reads only."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    if not tables and app_id in (0, APPLICATION_ID):
        return "empty"
    if app_id == APPLICATION_ID or (app_id == 0 and tables >= STORE_TABLES):
        return "store"
    return "foreign"


def table_list(conn: sqlite3.Connection) -> str:
    """The database's table names, for messages (at most eight)."""
    tables = sorted(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    return ", ".join(tables[:8]) + (", ..." if len(tables) > 8 else "")


def foreign_message(path: Path, conn: sqlite3.Connection) -> str:
    return (
        f"{path} is an SQLite database that is not a bbdecoder run store (tables: {table_list(conn)}); "
        "it was left untouched. Pass a save_path of its own (a new or empty folder) to the Analyzer"
    )


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def tidy_after_read(path: Path) -> None:
    """Remove the empty ``-wal``/``-shm`` files a read-only connection leaves next to a finished
    store (it may not delete them itself). SQLite's own close does it: a connection that closes
    last checkpoints and deletes them, and leaves them alone while any other connection (a writer
    that started meanwhile) is open. Call only when the store had no ``-wal`` when it was opened."""
    if not wal_path(path).exists() or not os.access(path.parent, os.W_OK):
        return
    try:
        conn = sqlite3.connect(str(path), timeout=1.0)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        pass
