"""Inserting many rows with few statements: one multi-row ``INSERT ... VALUES (...), (...)`` per
chunk instead of ``executemany``.

``executemany`` steps its statement once per row, and Python's ``sqlite3`` releases and retakes
the GIL around every step. On the store's writer thread that is hundreds of GIL hand-overs per
training step (one row per tensor and statistic): each time the training thread comes back from
a torch op it may wait for the GIL again. A multi-row statement binds the same values with the
same ``sqlite3_bind_*`` calls and steps once per chunk, so the stored rows are identical and a
failing row (a duplicate) still aborts the whole statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain
from typing import Any

__all__ = ["CHUNK_ROWS", "insert_rows"]

CHUNK_ROWS = 256
"""Rows per statement at most: a full chunk always has the same SQL text, so ``sqlite3``'s statement
cache prepares it once; a training loop's remainder is the same size every flush, cached too."""


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """Insert ``rows`` (tuples of one width) with ``head`` (``"INSERT INTO t VALUES"`` or with a
    column list), in order, in multi-row statements of at most :data:`CHUNK_ROWS` rows and at
    most the connection's host-parameter limit. Rows of different widths raise
    :class:`sqlite3.ProgrammingError` before anything of that chunk is inserted."""
    if not rows:
        return
    width = len(rows[0])
    per_statement = max(1, min(CHUNK_ROWS, _parameter_limit(conn) // width))
    for start in range(0, len(rows), per_statement):
        part = rows[start : start + per_statement]
        if len(set(map(len, part))) != 1:  # a short row and a long one would bind shifted values
            widths = sorted(set(map(len, part)))
            raise sqlite3.ProgrammingError(
                f"insert_rows: rows of widths {widths} in one insert; give every row {width} values"
            )
        conn.execute(_statement(head, width, len(part)), list(chain.from_iterable(part)))


@lru_cache(maxsize=256)
def _statement(head: str, width: int, n: int) -> str:
    """The SQL text of ``n`` rows of ``width`` values (the same few every flush: built once)."""
    group = "(" + ", ".join("?" * width) + ")"
    return f"{head} {', '.join([group] * n)}"


def _parameter_limit(conn: sqlite3.Connection) -> int:
    try:
        return conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    except (AttributeError, sqlite3.Error):  # pragma: no cover - Python < 3.11
        return 999  # SQLite's smallest default
