"""A consistent single-file copy of a run store, through SQLite's online backup API."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path

from bbdecoder.store.connection import db_path
from bbdecoder.store.schema import StoreError


def backup(save_path: str | Path, dest: str | Path) -> Path:
    """Copy the run store in ``save_path`` into one self-contained file and return its path.

    ``dest`` is a folder (the copy is ``dest/run.sqlite``) or a ``.sqlite``/``.db`` file name; it
    must not exist yet. The copy is one consistent state of the store, with every step committed
    when the copy began, also the commits still in ``run.sqlite-wal`` and also while a writer keeps
    writing (it is not blocked). The copy is in rollback-journal mode: a single file, readable
    from a read-only place; a writer that opens it later turns WAL mode back on.
    """
    from bbdecoder.store.reader import RunReader

    with RunReader(save_path) as reader:
        return reader.backup(dest)


def backup_connection(source: sqlite3.Connection, source_path: Path, dest: str | Path) -> Path:
    """:func:`backup` from an open (read-only) connection to the store at ``source_path``."""
    target = db_path(dest)
    if target.exists() or target.is_symlink():
        raise StoreError(f"{target} exists: pass a new file or folder as the backup destination")
    if target.resolve() == source_path.resolve():
        raise StoreError(f"the backup destination {target} is the store itself")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise StoreError(f"cannot write the backup {target}: {err}") from err
    tmp = Path(tmp_name)
    try:
        copy = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            source.backup(copy)  # one step: one read transaction, a consistent snapshot
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
        os.replace(tmp, target)
    except (sqlite3.Error, OSError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot back up the run store {source_path} to {target}: {err}") from err
    return target
