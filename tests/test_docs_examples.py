"""The README's and docs' Python examples run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        for number, code in enumerate(BLOCK.findall(document.read_text())):
            found.append((f"{document.relative_to(ROOT)}#{number}", code))
    return found


def test_readme_has_examples() -> None:
    assert any(name.startswith("README.md") for name, _ in _blocks())


@pytest.mark.parametrize(("name", "code"), _blocks(), ids=[name for name, _ in _blocks()])
def test_example_runs(name: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "keras" in name:
        pytest.importorskip("tensorflow", reason="the Keras docs need: pip install bbdecoder[tensorflow]")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    os.environ.setdefault("MPLBACKEND", "Agg")
    exec(compile(code, name, "exec"), {"__name__": "__example__"})
