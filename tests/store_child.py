"""For tests that run a run-store writer in a child process: a prelude that imports
``bbdecoder.store`` without the package root (which imports torch), so the child starts in about a
second instead of ten on a loaded machine."""

from __future__ import annotations

from pathlib import Path

import bbdecoder

PACKAGE = str(Path(bbdecoder.__file__).parent)

STORE_ONLY_PRELUDE = f"""
import sys, types
_package = types.ModuleType("bbdecoder")
_package.__path__ = [{PACKAGE!r}]
sys.modules["bbdecoder"] = _package
"""
