"""Progress output: a tqdm bar in a terminal, a few plain lines in a log; and the demo's missing
extra is exit 6 naming `pip install 'bbdecoder[demo]'`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from bbdecoder.progress import PlainProgress, is_terminal, progress_bar, stage

ROOT = Path(__file__).resolve().parents[1]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_stage_and_no_carriage_returns() -> None:
    log = io.StringIO()
    for epoch in range(3):
        bar = progress_bar(50, f"epoch {epoch + 1}/3", unit="batches", stream=log)
        assert isinstance(bar, PlainProgress)
        for _ in range(50):
            bar.update()
            bar.set_postfix(loss="0.500")
        bar.set_postfix(loss="0.250", test_acc="0.900")
        bar.close()
        bar.close()  # closing twice prints once
    stage("next stage ...", stream=log)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 4
    assert lines[0].startswith("epoch 1/3: 50/50 batches, loss=0.250, test_acc=0.900 (")
    assert lines[0].endswith(" s)") and lines[3] == "next stage ..."


def test_a_terminal_gets_a_tqdm_bar() -> None:
    terminal = FakeTerminal()
    bar = progress_bar(5, "epoch 1/1", stream=terminal)
    assert not isinstance(bar, PlainProgress)
    for _ in range(5):
        bar.update()
    bar.close()
    assert "\r" in terminal.getvalue() and "5/5" in terminal.getvalue()


def test_disabled_progress_prints_nothing_anywhere() -> None:
    for stream in (io.StringIO(), FakeTerminal()):
        bar = progress_bar(3, "x", enabled=False, stream=stream)
        bar.update()
        bar.close()
        stage("x", enabled=False, stream=stream)
        assert stream.getvalue() == ""


def test_is_terminal_of_odd_streams() -> None:
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(None) and not is_terminal(closed) and not is_terminal(io.StringIO())
    assert is_terminal(FakeTerminal())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_demo_without_scikit_learn_exits_6_naming_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from bbdecoder.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path / 'demo')!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert done.returncode == 6, done.stderr
    assert "pip install 'bbdecoder[demo]'" in done.stderr and "scikit-learn" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "demo" / "run.sqlite").exists()  # refused before any work
