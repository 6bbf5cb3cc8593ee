"""The demo's own dependencies (the ``demo`` extra), checked before any work starts."""

from __future__ import annotations

import importlib

DEMO_EXTRA = "pip install 'bbdecoder[demo]'"
REQUIRED = {"sklearn": "scikit-learn (the bundled digits)", "PIL": "Pillow (the sample and overlay PNGs)"}


class DemoDependencyError(ImportError):
    """A package of the ``demo`` extra is missing; the message names it and the install command."""


def require_demo_dependencies() -> None:
    """Import every package the demo needs; raise :class:`DemoDependencyError` naming the missing ones
    and ``pip install 'bbdecoder[demo]'``."""
    missing = []
    for module, what in REQUIRED.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(what)
    if missing:
        raise DemoDependencyError(
            f"bbdecoder demo needs {' and '.join(missing)}, which is not installed; install the demo "
            f"extra: {DEMO_EXTRA}"
        )


__all__ = ["DEMO_EXTRA", "DemoDependencyError", "require_demo_dependencies"]
