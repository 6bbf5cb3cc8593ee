"""The layers the Keras monitor names and selects: qualified names and selections of leaf layers."""

from __future__ import annotations

from typing import Any

from bbdecoder.keras.layers import check_model, leaf_layers


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
