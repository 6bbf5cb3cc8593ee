"""The store's multi-row inserts against ``executemany``: the same rows, bit for bit, in order."""

from __future__ import annotations

import math
import sqlite3
import struct

import pytest

from bbdecoder.store.bulk_insert import CHUNK_ROWS, insert_rows

SCHEMA = (
    "(step INTEGER NOT NULL, series_id INTEGER NOT NULL, value REAL, data BLOB, UNIQUE (step, series_id))"
)


def _connection() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(f"CREATE TABLE bulk {SCHEMA}")
    conn.execute(f"CREATE TABLE oracle {SCHEMA}")
    return conn


def _rows(n: int) -> list[tuple[int, int, float | None, bytes | None]]:
    def value(k: int) -> float | None:
        return [math.pi * (k - 7) / 3, -0.0, 5e-324, 1.7976931348623157e308, None, 1e-300][k % 6]

    return [(k // 9, k % 9, value(k), bytes([k % 251]) * (k % 3) if k % 4 else None) for k in range(n)]


def _stored(conn: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    rows = conn.execute(f"SELECT step, series_id, value, data FROM {table} ORDER BY rowid").fetchall()
    # floats compared by their bits: -0.0 and the subnormals must survive
    return [(s, i, None if v is None else struct.pack("<d", v), d) for s, i, v, d in rows]


@pytest.mark.parametrize("n", [0, 1, CHUNK_ROWS - 1, CHUNK_ROWS, CHUNK_ROWS + 1, 3 * CHUNK_ROWS + 17])
def test_same_rows_as_executemany(n: int) -> None:
    conn = _connection()
    rows = _rows(n)
    insert_rows(conn, "INSERT INTO bulk VALUES", rows)
    conn.executemany("INSERT INTO oracle VALUES (?, ?, ?, ?)", rows)
    assert _stored(conn, "bulk") == _stored(conn, "oracle")
    assert len(_stored(conn, "bulk")) == n


def test_statements_respect_the_parameter_limit() -> None:
    conn = _connection()
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)  # two rows of four columns a statement
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    rows = _rows(7)
    insert_rows(conn, "INSERT INTO bulk (step, series_id, value, data) VALUES", rows)
    conn.set_trace_callback(None)
    conn.executemany("INSERT INTO oracle VALUES (?, ?, ?, ?)", rows)
    assert _stored(conn, "bulk") == _stored(conn, "oracle")
    assert len(statements) == 4  # 2 + 2 + 2 + 1 rows


def test_a_bad_row_aborts_its_transaction() -> None:
    conn = _connection()
    rows = _rows(20)
    rows.append(rows[3])  # a duplicate (step, series_id): the whole insert must fail
    conn.execute("BEGIN")
    with pytest.raises(sqlite3.IntegrityError):
        insert_rows(conn, "INSERT INTO bulk VALUES", rows)
    conn.execute("ROLLBACK")
    assert _stored(conn, "bulk") == []


def test_rows_of_the_wrong_width_are_refused() -> None:
    conn = _connection()
    with pytest.raises(sqlite3.ProgrammingError):
        insert_rows(conn, "INSERT INTO bulk VALUES", [(1, 2, 3.0, None), (1, 3, 4.0)])


def test_rows_whose_widths_add_up_are_refused_too() -> None:
    # 3 + 5 values bind as 2 x 4 without the width check: shifted columns, no error from SQLite
    conn = _connection()
    with pytest.raises(sqlite3.ProgrammingError, match="widths"):
        insert_rows(conn, "INSERT INTO bulk VALUES", [(1, 2, 3.0), (1, 3, 4.0, None, 7)])
    assert _stored(conn, "bulk") == []
