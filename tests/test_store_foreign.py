"""The writer refuses an SQLite file that is not a bbdecoder store and leaves it byte-for-byte as it
was (issue 16, item 7)."""

from __future__ import annotations

import sqlite3

import pytest
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.store import RunWriter, StoreError, open_run


def _foreign_db(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO customers (name) VALUES (?)", [("ada",), ("grace",)])
    conn.commit()
    conn.close()
    return path.read_bytes()


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", ["mydata.db", "run.sqlite"])
def test_foreign_database_is_refused_untouched(tmp_path, name) -> None:
    path = tmp_path / name
    before = _foreign_db(path)
    save_path = path if name.endswith(".db") else tmp_path  # a file, or a folder whose run.sqlite is not ours
    with pytest.raises(StoreError, match=r"not a bbdecoder run store \(tables: customers\).*left untouched"):
        RunWriter(save_path)
    assert path.read_bytes() == before  # no tables added, journal mode (header bytes 18-19) unchanged
    assert _listing(tmp_path) == [name]  # no lock file, -wal or -shm left behind
    with pytest.raises(StoreError, match="not a bbdecoder run store"):
        Analyzer(nn.Linear(2, 2), save_path)
    assert path.read_bytes() == before
    with pytest.raises(StoreError, match=r"not a bbdecoder run store \(tables: customers\)"):
        open_run(save_path)
    assert path.read_bytes() == before


def test_file_that_is_not_sqlite_is_refused_untouched(tmp_path) -> None:
    path = tmp_path / "run.sqlite"
    path.write_bytes(b"my notes, not a database\n" * 200)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=r"run.sqlite is not an SQLite database .*left untouched"):
        RunWriter(tmp_path)
    assert path.read_bytes() == before and _listing(tmp_path) == ["run.sqlite"]
    with pytest.raises(StoreError, match="not an SQLite database"):
        open_run(tmp_path)


def test_empty_file_and_own_store_are_adopted(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.sqlite").touch()  # an empty file is an empty database
    with RunWriter(tmp_path / "a") as writer:
        writer.add_step(0, 0, 1.0)
    with RunWriter(tmp_path / "a") as writer:  # our own store: appended to
        assert writer.next_step() == 1
    conn = sqlite3.connect(tmp_path / "a" / "run.sqlite")
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x62624452
    conn.close()
