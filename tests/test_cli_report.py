"""``bbdecoder report`` writes report.html atomically and never through a symlink (issue 16, item 15)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bbdecoder.cli import EXIT_OK, EXIT_USAGE, main
from bbdecoder.report import build_report
from bbdecoder.store import RunWriter


@pytest.fixture
def received(tmp_path: Path) -> dict[str, Path]:
    """A run folder as received from someone else: its report.html links to a file outside it."""
    run = tmp_path / "received_run"
    writer = RunWriter(run)
    writer.set_layers([(0, "fc", "Linear", 42, None)])
    writer.close()
    victim = tmp_path / "outside" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("do not overwrite me")
    (run / "report.html").symlink_to(victim)
    return {"run": run, "victim": victim}


def test_report_replaces_a_symlinked_report_html_instead_of_writing_through_it(received, capsys) -> None:
    run, victim = received["run"], received["victim"]
    before = victim.stat()
    code = main(["report", str(run)])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert victim.read_text() == "do not overwrite me"
    assert victim.stat().st_mtime_ns == before.st_mtime_ns and victim.stat().st_size == before.st_size
    page = run / "report.html"
    assert not page.is_symlink() and page.is_file()
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>") and "fc" in page.read_text()
    assert sorted(p.name for p in run.iterdir()) == sorted(["report.html", "run.sqlite", *_sidecars(run)])
    assert f"wrote {page}" in out


def _sidecars(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.name.startswith("run.sqlite-")]


def test_a_dangling_link_and_the_api(received, tmp_path: Path) -> None:
    run = received["run"]
    (run / "report.html").unlink()
    (run / "report.html").symlink_to(tmp_path / "outside" / "new_file.html")  # does not exist yet
    page = build_report(run)
    assert not (tmp_path / "outside" / "new_file.html").exists()
    assert page == run / "report.html" and page.is_file() and not page.is_symlink()
    mode = page.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_report_out_errors(received, tmp_path: Path, capsys) -> None:
    run = received["run"]
    code = main(["report", str(run), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and err.startswith("bbdecoder report: error: --out ") and "is a folder" in err
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "report.html is a folder" in err
