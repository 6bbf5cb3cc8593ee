"""Whether an Analyzer may write into a run folder that already holds a run.

A store with recorded steps is appended to only with ``resume=True`` and only by the same model:
the same parameter names with the same shapes, stored with the run as the artifact
``parameters.json`` (``open_run(path).artifact("parameters.json")``). Stores written before that
artifact existed are compared by their layer table (names, types, sizes).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from torch import nn

from bbdecoder.store import StoreError
from bbdecoder.store.vocabulary import PARAMETERS_ARTIFACT


def parameter_signature(model: nn.Module) -> list[list[Any]]:
    """``[[name, [shape...]], ...]`` of every parameter of ``model`` (trainable or not)."""
    return [[name, list(p.shape)] for name, p in model.named_parameters()]


def _stored(path: Path) -> tuple[list[list[Any]] | None, list[tuple[Any, ...]], str | None]:
    """The stored parameter signature (or ``None``), the layer rows and the model's class name."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        stored = conn.execute(
            "SELECT content FROM artifacts WHERE name = ?", (PARAMETERS_ARTIFACT,)
        ).fetchone()
        layers = [
            tuple(r)
            for r in conn.execute("SELECT layer_id, name, type, params FROM layers ORDER BY layer_id")
        ]
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    signature = json.loads(stored[0]) if stored is not None else None
    return signature, layers, meta.get("model")


def _difference(stored: list[list[Any]], current: list[list[Any]]) -> str:
    old, new = {n: s for n, s in stored}, {n: s for n, s in current}
    parts = []
    missing = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    reshaped = [f"{n} {old[n]} -> {new[n]}" for n in new if n in old and old[n] != new[n]]
    if missing:
        parts.append(
            f"{len(missing)} stored parameters are not in this model (e.g. {', '.join(missing[:3])})"
        )
    if added:
        parts.append(
            f"{len(added)} parameters of this model are not in the store (e.g. {', '.join(added[:3])})"
        )
    if reshaped:
        parts.append(f"{len(reshaped)} have another shape (e.g. {'; '.join(reshaped[:3])})")
    return "; ".join(parts) or "the parameters are in another order"


def check_run_folder(writer: Any, model: nn.Module, layer_rows: list[tuple[Any, ...]], resume: bool) -> None:
    """Refuse a store that holds steps unless ``resume`` and the model matches; the message says why."""
    steps = writer.next_step()
    path = getattr(writer, "path", None)
    if not steps or not isinstance(path, Path) or not path.is_file():
        return  # a new store, or one without steps (nothing to mix with), or a rank that does not write
    signature, layers, kind = _stored(path)
    model_kind = kind or "model"
    where = f"{path.parent} holds a run of another {model_kind} ({steps} steps)"
    if not resume:
        raise StoreError(
            f"{path.parent} already holds a run of {model_kind} ({steps} steps). Pass resume=True to "
            "append to it (the same model, continuing its steps and "
            "epochs), or a new save_path for a new run"
        )
    current = parameter_signature(model)
    if signature is not None:
        if signature != current:
            raise StoreError(
                f"{where}, so resume=True cannot append to it: "
                f"{_difference(signature, current)}. Pass a new save_path for this model"
            )
        return
    mine = [tuple(r[:4]) for r in layer_rows]
    if layers != mine:
        raise StoreError(
            f"{where} whose layer table differs from this model's ({len(layers)} stored layers, "
            f"{len(mine)} here), so resume=True cannot append to it. Pass a new save_path for this model"
        )
