"""LayerIndex: every leaf module of a model gets a stable ID and its qualified name.

IDs follow ``model.named_modules()`` order (the order modules are *declared*, not the order they
run), counting only leaves (modules without children). Shared modules appear once.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

LayerSelector = int | str | type | nn.Module
"""One layer selector: an ID, a qualified name or glob pattern, a module type, or a module."""

LayerSelection = LayerSelector | Sequence[LayerSelector] | None
"""``None`` (every layer), one selector, or a sequence of selectors (mixed kinds allowed)."""

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class LayerInfo:
    """One leaf module: its ID, qualified name (``""`` for a model that is itself a leaf), module."""

    id: int
    name: str
    module: nn.Module

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))

    @property
    def display_name(self) -> str:
        return self.name or "(root)"


class LayerIndex:
    """IDs and qualified names of a model's leaf modules, with selection by ID/name/glob/type.

    >>> index = LayerIndex(model)
    >>> index.select([0, "fc", "layer1.*.conv1", nn.BatchNorm2d])  # -> list[LayerInfo]
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers: list[LayerInfo] = []
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                self._layers.append(LayerInfo(len(self._layers), name, module))
        self._by_name = {layer.name: layer for layer in self._layers}
        self._by_module = {id(layer.module): layer for layer in self._layers}

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self._layers)

    def __getitem__(self, layer_id: int) -> LayerInfo:
        return self._by_id(layer_id)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def by_module(self, module: nn.Module) -> LayerInfo | None:
        """The leaf entry of ``module``, or ``None`` when it is not a leaf of this model."""
        return self._by_module.get(id(module))

    def select(self, selection: LayerSelection = None) -> list[LayerInfo]:
        """Resolve a selection to layers, in ID order, without duplicates.

        ``None`` selects every layer. A string with ``*?[`` is a glob over qualified names. A type
        selects every leaf that is an instance of it. Raises ``KeyError``/``IndexError``/``TypeError``
        naming what was not found and what would have been valid.
        """
        if selection is None:
            return list(self._layers)
        if isinstance(selection, (int, str, type, nn.Module)):
            selection = [selection]
        if not isinstance(selection, Sequence):
            raise TypeError(
                f"cannot select layers with {selection!r} ({type(selection).__name__}); use an int ID, a "
                "qualified name or glob pattern, a module type, a module, or a list of these"
            )
        chosen: dict[int, LayerInfo] = {}
        for selector in selection:
            for layer in self._resolve_one(selector):
                chosen[layer.id] = layer
        return [chosen[k] for k in sorted(chosen)]

    def _by_id(self, layer_id: int) -> LayerInfo:
        if not 0 <= layer_id < len(self._layers):
            raise IndexError(
                f"layer ID {layer_id} does not exist: this model has {len(self._layers)} leaf layers "
                f"with IDs 0..{len(self._layers) - 1} (see `summary()` or `bbdecoder layers`)"
            )
        return self._layers[layer_id]

    def _resolve_one(self, selector: LayerSelector) -> list[LayerInfo]:
        if isinstance(selector, bool):
            raise TypeError(f"a layer selector cannot be a bool ({selector!r})")
        if isinstance(selector, int):
            return [self._by_id(selector)]
        if isinstance(selector, str):
            if _GLOB_CHARS & set(selector):
                found = [layer for layer in self._layers if fnmatch.fnmatchcase(layer.name, selector)]
                if not found:
                    raise KeyError(f"the pattern {selector!r} matches no layer name of this model")
                return found
            if selector in self._by_name:
                return [self._by_name[selector]]
            close = difflib.get_close_matches(selector, self.names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no leaf layer is named {selector!r}{hint}")
        if isinstance(selector, type) and issubclass(selector, nn.Module):
            found = [layer for layer in self._layers if isinstance(layer.module, selector)]
            if not found:
                raise KeyError(f"this model has no leaf layer of type {selector.__name__}")
            return found
        if isinstance(selector, nn.Module):
            layer = self.by_module(selector)
            if layer is None:
                raise KeyError(f"the module {type(selector).__name__} is not a leaf layer of this model")
            return [layer]
        raise TypeError(
            f"cannot select layers with {selector!r} ({type(selector).__name__}); use an int ID, a "
            "qualified name or glob pattern, a module type, or a module"
        )

    def table(self) -> list[dict[str, object]]:
        """Rows of ``{"id", "name", "type", "params"}``, one per leaf layer."""
        return [
            {"id": layer.id, "name": layer.display_name, "type": layer.type_name, "params": layer.num_params}
            for layer in self._layers
        ]


def find_modules(model: nn.Module, selection: LayerSelection) -> list[tuple[str, nn.Module]]:
    """Resolve a selection to ``(qualified name, module)`` pairs over *every* module, not only leaves.

    Unlike :meth:`LayerIndex.select`, a name may be any module's (a block, a stage, the root ``""``), a
    glob pattern (``*?[``) is matched against every module's qualified name, and a module may be any
    submodule. An ``int`` is a leaf ID (as ``bbdecoder layers`` shows them) and a type selects every
    module of that type. The result keeps the selection's order, without duplicates; raises
    ``KeyError``/``IndexError``/``TypeError`` naming what was not found.
    """
    if selection is None:
        raise TypeError("a layer selection is required here (None selects nothing)")
    items: Sequence[LayerSelector]
    if isinstance(selection, (int, str, type, nn.Module)):
        items = [selection]
    elif isinstance(selection, Sequence):
        items = selection
    else:
        raise TypeError(
            f"cannot select layers with {selection!r} ({type(selection).__name__}); use a module, a "
            "qualified name or glob pattern, an int leaf ID, a module type, or a list of these"
        )
    named = list(model.named_modules(remove_duplicate=True))
    by_name = dict(named)
    names_of = {id(module): name for name, module in named}
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for selector in items:
        if isinstance(selector, bool):
            raise TypeError(f"a layer selector cannot be a bool ({selector!r})")
        if isinstance(selector, int):
            info = LayerIndex(model)[selector]
            found = [(info.name, info.module)]
        elif isinstance(selector, str):
            if _GLOB_CHARS & set(selector):
                found = [(name, module) for name, module in named if fnmatch.fnmatchcase(name, selector)]
                if not found:
                    raise KeyError(f"the pattern {selector!r} matches no module name of this model")
            elif selector in by_name:
                found = [(selector, by_name[selector])]
            else:
                close = difflib.get_close_matches(selector, [n for n in by_name if n], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise KeyError(f"no module is named {selector!r}{hint}")
        elif isinstance(selector, type) and issubclass(selector, nn.Module):
            found = [(name, module) for name, module in named if isinstance(module, selector)]
            if not found:
                raise KeyError(f"this model has no module of type {selector.__name__}")
        elif isinstance(selector, nn.Module):
            if id(selector) not in names_of:
                raise KeyError(f"the module {type(selector).__name__} is not part of this model")
            found = [(names_of[id(selector)], selector)]
        else:
            raise TypeError(
                f"cannot select layers with {selector!r} ({type(selector).__name__}); use a module, a "
                "qualified name or glob pattern, an int leaf ID, or a module type"
            )
        for name, module in found:
            chosen.setdefault(id(module), (name, module))
    return list(chosen.values())
