"""The documentation site builds with warnings as errors, and its API reference covers every public
name: a public name without a docstring, one listed in ``__all__`` but missing, a broken link or
a cross-reference to a renamed name fails the build."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed: pip install -e '.[docs]' (make test's venv has them)",
)


def _hooks() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "tools" / "mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_site_builds_strictly_with_every_public_name(tmp_path: Path) -> None:
    import bbdecoder

    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site), "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (site / "api.html").read_text()
    for name in bbdecoder.__all__:
        if name.startswith("__"):
            continue
        assert f'id="bbdecoder.{name}"' in api or f"<code>{name}</code>" in api, name
    for page in ("index", "getting_started", "reading_the_report", "coming_from", "attribution", "scale"):
        assert (site / f"{page}.html").is_file(), page
    assert 'href="scale.html"' in (site / "index.html").read_text()
    # the README's attribution section is pasted into its concept page
    assert "completeness" in (site / "attribution.html").read_text()


def _fake_package(**members: object) -> types.ModuleType:
    package = types.ModuleType("bbdecoder")
    package.__all__ = [*members, "missing"]  # type: ignore[attr-defined]
    for name, value in members.items():
        setattr(package, name, value)
    return package


def test_reference_warns_on_undocumented_and_missing_names(monkeypatch, caplog) -> None:
    hooks = _hooks()

    def documented() -> None:
        """Returns nothing."""

    def undocumented() -> None:
        pass

    class Documented:
        """A class."""

    class Subclass(Documented):  # inherits a docstring, has none of its own
        pass

    for thing in (documented, undocumented, Documented, Subclass):
        thing.__module__ = "bbdecoder.attribution.fake"
    package = _fake_package(documented=documented, undocumented=undocumented, Documented=Documented,
                            Subclass=Subclass, alias=Documented)  # fmt: skip
    monkeypatch.setattr(hooks, "_package", lambda: package)
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.bbdecoder"):
        page = hooks.api_reference()
    warnings = [record.getMessage() for record in caplog.records]
    assert any("bbdecoder.undocumented has no docstring" in w for w in warnings), warnings
    assert any("bbdecoder.Subclass has no docstring" in w for w in warnings), warnings
    assert any("'missing'" in w for w in warnings), warnings
    assert not any("bbdecoder.documented " in w or "bbdecoder.Documented " in w for w in warnings)
    assert "## Explainers" in page and "::: bbdecoder.documented" in page
    assert "An alias of [`Documented`][bbdecoder.Documented]" in page


def test_pages_missing_from_the_nav_are_added(tmp_path: Path) -> None:
    hooks = _hooks()
    (tmp_path / "index.md").write_text("# Home\n")
    (tmp_path / "store.md").write_text("intro\n# What the store promises\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep_page.md").write_text("no heading\n")
    config = {"nav": [{"Home": "index.md"}], "docs_dir": str(tmp_path)}
    nav = hooks.on_config(config)["nav"]
    assert nav == [
        {"Home": "index.md"},
        {"More": [{"What the store promises": "store.md"}, {"Deep page": "sub/deep_page.md"}]},
    ]
