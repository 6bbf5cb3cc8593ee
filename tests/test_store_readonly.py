"""A finished store is readable without write access to its folder (a read-only mount, a colleague's
folder, an archive), and a store that cannot be read says why (issue 16, item 5)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bbdecoder.cli import main
from bbdecoder.report import build_report
from bbdecoder.store import RunWriter, StoreError, backup, open_run
from bbdecoder.store.export import export_csv
from tests.store_child import STORE_ONLY_PRELUDE


def _finished_store(folder: Path, steps: int = 5) -> None:
    with RunWriter(folder) as writer:
        writer.set_layers([(0, "fc", "Linear", 6, None)])
        sid, mean = writer.series_id(0, "fc.weight"), writer.stat_id("mean")
        for step in range(steps):
            writer.add_step(step, 0, 1.0 / (step + 1))
            writer.add_scalars([(step, 0, sid, mean, float(step))])
            writer.flush()


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` seen read-only: a read-only bind mount as root (permission bits do not stop root),
    the permission bits otherwise. Skips where neither is possible."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    view = folder.with_name(folder.name + "_ro")
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"a read-only bind mount is not permitted here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True)
        with pytest.raises(OSError):  # really read-only, also for root
            (view / "probe").touch()
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def test_finished_store_in_a_read_only_folder(tmp_path, capsys) -> None:
    _finished_store(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.sqlite"]
    with _read_only(tmp_path / "run") as ro:
        with open_run(ro) as run:  # on main: "is not a bbdecoder run store (unable to open database file)"
            assert run.steps()["step"].tolist() == [0, 1, 2, 3, 4]
            assert run.scalars()["value"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
            assert run.integrity_check() == "ok"
        assert {p.name for p in export_csv(ro, tmp_path / "csv")} >= {"scalars.csv", "layers.csv"}
        assert main(["export", str(ro), "--csv", str(tmp_path / "csv2")]) == 0
        page = build_report(ro, tmp_path / "report.html")
        assert page.stat().st_size > 1000
        assert main(["report", str(ro), "--out", str(tmp_path / "cli.html")]) == 0
        assert (tmp_path / "cli.html").stat().st_size > 1000
        assert backup(ro, tmp_path / "copy.sqlite").exists()
        with pytest.raises(StoreError, match=str(ro)):
            RunWriter(ro)  # a writer is refused with the path, and a reason
    with open_run(tmp_path / "copy.sqlite") as copy:
        assert copy.steps()["step"].tolist() == [0, 1, 2, 3, 4]
    capsys.readouterr()


KILLED = STORE_ONLY_PRELUDE + textwrap.dedent(
    """
    import os, signal, sys
    from bbdecoder.store.writer import RunWriter
    writer = RunWriter(sys.argv[1])
    sid, mean = writer.series_id(0, "w"), writer.stat_id("mean")
    for step in range(4):
        writer.add_step(step, 0, None)
        writer.add_scalars([(step, 0, sid, mean, float(step))])
        writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the WAL keeps the commits; nothing cleans up
    """
)


@pytest.mark.timeout(120)
def test_killed_writers_store_with_its_wal_in_a_read_only_folder(tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(KILLED)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "run.sqlite-wal").stat().st_size > 0
    with _read_only(tmp_path / "run") as ro, open_run(ro) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2, 3]  # read through the WAL
    # without its -shm, a read-only folder cannot serve the WAL: the message says so and what to do
    shutil.copytree(tmp_path / "run", tmp_path / "noshm")
    (tmp_path / "noshm" / "run.sqlite-shm").unlink()
    with (
        _read_only(tmp_path / "noshm") as ro,
        pytest.raises(StoreError, match=r"run.sqlite-wal holds commits.*copy"),
    ):
        open_run(ro)


def test_reading_a_finished_store_leaves_its_folder_as_it_was(tmp_path) -> None:
    _finished_store(tmp_path)
    with open_run(tmp_path) as run:
        assert len(run.steps()) == 5
    build_report(tmp_path, tmp_path / "page.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "run.sqlite"]  # no -wal, -shm left


def test_unreadable_and_missing_stores_name_the_cause(tmp_path) -> None:
    with pytest.raises(StoreError, match="no run store at"):
        open_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run.sqlite").touch()
    with pytest.raises(StoreError, match=r"is not a bbdecoder run store \(an empty database\)"):
        open_run(tmp_path / "empty")
    if os.geteuid() != 0:  # root reads whatever the bits say
        _finished_store(tmp_path / "locked")
        (tmp_path / "locked" / "run.sqlite").chmod(0)
        with pytest.raises(StoreError, match="permission denied"):
            open_run(tmp_path / "locked")
