"""The layers the Keras monitor names and selects: qualified names, selections of leaf layers and
the variables tracked in them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bbdecoder.keras.layers import check_model, leaf_layers
from bbdecoder.monitor.recorder import Series


@dataclass
class TrackedVariable(Series):
    """One tracked trainable variable: the recorder's series and the variable itself."""

    variable: Any = field(kw_only=True)


def qualified_layer_names(model: Any) -> dict[int, str]:
    """``{id(layer): qualified name}`` for every layer nested in ``model`` (names joined by ``.``)."""
    names: dict[int, str] = {}

    def walk(layer: Any, prefix: str) -> None:
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in names:
                continue
            name = f"{prefix}.{child.name}" if prefix else child.name
            names[id(child)] = name
            walk(child, name)

    walk(check_model(model), "")
    return names


def select_leaves(model: Any, selection: Any) -> list[tuple[int, Any]]:
    """``(leaf id, layer)`` pairs of ``selection`` (IDs, names, layer objects or a list of these;
    ``None``/``True``: all), in ID order; raises naming the leaves when a selector matches none."""
    leaves = list(enumerate(leaf_layers(model)))
    if selection is None or selection is True:
        return leaves
    wanted = selection if isinstance(selection, (list, tuple)) else [selection]
    chosen: dict[int, Any] = {}
    for selector in wanted:
        found = [
            (i, layer)
            for i, layer in leaves
            if layer is selector
            or (isinstance(selector, str) and layer.name == selector)
            or (isinstance(selector, int) and not isinstance(selector, bool) and i == selector)
        ]
        if not found:
            names = ", ".join(f"[{i}] {layer.name}" for i, layer in leaves)
            raise ValueError(f"no leaf layer matches {selector!r}; the model's leaf layers: {names}")
        chosen.update(found)
    return sorted(chosen.items(), key=lambda item: item[0])


def tracked_variables(
    model: Any, selection: Any, names: dict[int, str], writer: Any
) -> list[TrackedVariable]:
    """The trainable variables of the leaf layers of ``selection`` (see :func:`select_leaves`), each
    once (a variable shared by two layers belongs to the first), as series of ``writer``; stored
    names ``<qualified layer name>.<variable name>``."""
    tracked: list[TrackedVariable] = []
    seen: set[int] = set()
    for layer_id, layer in select_leaves(model, selection):
        qualified = names.get(id(layer), layer.name)
        for variable in layer.trainable_weights:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            param = f"{qualified}.{variable.name}"
            sid = writer.series_id(layer_id, param)
            tracked.append(TrackedVariable(len(tracked), layer_id, qualified, param, sid, variable=variable))
    return tracked
