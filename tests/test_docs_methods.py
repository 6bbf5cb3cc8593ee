"""docs/methods.md's method table is the registry's, and the CLI lists exactly the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bbdecoder import list_methods
from bbdecoder.attribution.registry import markdown_table
from bbdecoder.cli import METHODS, main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_docs_table_is_the_registry() -> None:
    text = PAGE.read_text()
    begin, end = "<!-- methods-table:begin -->\n", "\n<!-- methods-table:end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == markdown_table(), (
        "docs/methods.md's table differs from the registry; paste "
        "bbdecoder.attribution.registry.markdown_table() between the markers"
    )
    assert "methods.md" in (PAGE.parents[1] / "mkdocs.yml").read_text()


def test_cli_methods_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing] == [s.name for s in list_methods()] == list(METHODS)
    ig = next(m for m in listing if m["name"] == "ig")
    steps = next(o for o in ig["options"] if o["name"] == "n_steps")
    assert steps == {
        "name": "n_steps", "type": "int", "default": 50, "flag": "--steps", "help": "path steps",
        "stage": "call",
    }  # fmt: skip
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "gradcam++ (also: gradcampp, gradcam_plusplus): Grad-CAM++, cam, non-negative" in text
    assert "n_masks=4000 [--masks]: random masks per input" in text
    assert main(["methods", "--framework", "keras", "--json"]) == 0
    keras = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in keras] == [s.name for s in list_methods("keras")]
