"""Which parameters the monitor tracks, under which name and layer ID.

Every trainable parameter is tracked exactly once, whoever owns it:

- a **leaf** module (no children): the layer ID is the leaf's ID in :class:`~bbdecoder.layers.LayerIndex`;
- a module **with children** that owns parameters itself (timm's ``BatchNormAct2d``, a ViT whose
  ``cls_token``/``pos_embed`` sit on the container, a LightningModule's own parameter, the root):
  such an *owner* gets its own ID after the leaves (``len(index)``, ``len(index) + 1``, ... in
  ``named_modules()`` order), with its qualified name (``""`` for the root, shown as ``(root)``) and
  its type, so the report reads ``[57] bn1 (BatchNormAct2d)`` rather than borrowing a child's name;
- tied weights (one tensor under two names) are tracked once, under the first name
  ``named_parameters()`` gives.

Names are the ``state_dict`` names of the **unwrapped** model: ``torch.compile``'s
``OptimizedModule``, ``DistributedDataParallel`` and ``DataParallel`` are seen through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bbdecoder.layers import LayerIndex, LayerSelection, LayerSelector


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile`` / ``DistributedDataParallel`` / ``DataParallel``
    wrappers (any nesting), so names match the unwrapped model's ``state_dict``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif (
            isinstance(getattr(model, "_orig_mod", None), nn.Module)
            and type(model).__name__ == "OptimizedModule"
        ):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


@dataclass(frozen=True)
class Owner:
    """A module owning parameters: a leaf (its LayerIndex ID) or a container (an ID after the leaves)."""

    id: int
    name: str
    module: nn.Module
    leaf: bool

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def display_name(self) -> str:
        return self.name or "(root)"

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))


@dataclass(frozen=True)
class TrackedParam:
    """One tracked tensor: its ``state_dict`` name and the owner it belongs to."""

    name: str
    tensor: torch.Tensor
    owner: Owner


@dataclass(frozen=True)
class Coverage:
    """How much of the model is tracked (for ``summary()`` and the report)."""

    tracked_tensors: int
    tracked_elements: int
    trainable_tensors: int
    trainable_elements: int
    total_tensors: int
    total_elements: int

    def describe(self) -> str:
        return (
            f"tracked {self.tracked_tensors} of {self.trainable_tensors} trainable parameter tensors "
            f"({self.tracked_elements:,} of {self.trainable_elements:,} elements; the model has "
            f"{self.total_tensors} tensors, {self.total_elements:,} elements in all)"
        )


class ParamOwners:
    """Owners of a model's parameters: the leaves of ``index`` plus every container owning parameters."""

    def __init__(self, model: nn.Module, index: LayerIndex) -> None:
        self.model = model
        self.index = index
        self.owners: list[Owner] = [Owner(L.id, L.name, L.module, True) for L in index]
        by_module = {id(o.module): o for o in self.owners}
        for name, module in model.named_modules():
            if id(module) in by_module:
                continue
            if any(True for _ in module.parameters(recurse=False)):
                owner = Owner(len(self.owners), name, module, False)
                self.owners.append(owner)
                by_module[id(module)] = owner
        self._by_module = by_module
        self._containers = {o.name: o for o in self.owners if not o.leaf}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.owners)

    def __getitem__(self, owner_id: int) -> Owner:
        return self.owners[owner_id]

    def params(self) -> list[TrackedParam]:
        """Every trainable parameter once (tied weights under their first name), in
        ``named_parameters()`` order."""
        out = []
        for name, tensor in self.model.named_parameters():
            if not tensor.requires_grad:
                continue
            owner_name = name.rpartition(".")[0]
            owner = self._by_module[id(self.model.get_submodule(owner_name))]
            out.append(TrackedParam(name, tensor, owner))
        return out

    def select(self, selection: LayerSelection) -> list[Owner]:
        """Owners chosen by ``selection``: leaf selectors as in :meth:`LayerIndex.select`, plus a
        container's qualified name or its ID (``>= len(index)``). ``None``: every owner."""
        if selection is None:
            return list(self.owners)
        items: Sequence[LayerSelector]
        if isinstance(selection, (int, str, type, nn.Module)):
            items = [selection]
        elif isinstance(selection, Sequence):
            items = selection
        else:
            return [self._by_module[id(L.module)] for L in self.index.select(selection)]  # raises TypeError
        if len(items) == 0:
            raise ValueError(
                "the layer selection is empty; pass None to track every layer, or name some layers"
            )
        chosen: dict[int, Owner] = {}
        for item in items:
            if (
                isinstance(item, int)
                and not isinstance(item, bool)
                and len(self.index) <= item < len(self.owners)
            ):
                chosen[item] = self.owners[item]
            elif isinstance(item, str) and item in self._containers and item not in self.index.names:
                chosen[self._containers[item].id] = self._containers[item]
            elif (
                isinstance(item, nn.Module)
                and id(item) in self._by_module
                and not self._by_module[id(item)].leaf
            ):
                owner = self._by_module[id(item)]
                chosen[owner.id] = owner
            else:
                for L in self.index.select(item):
                    chosen[L.id] = self.owners[L.id]
        return [chosen[k] for k in sorted(chosen)]

    def coverage(self, tracked: list[TrackedParam]) -> Coverage:
        every = list(self.model.parameters())
        trainable = [p for p in every if p.requires_grad]
        return Coverage(
            len(tracked),
            sum(p.tensor.numel() for p in tracked),
            len(trainable),
            sum(p.numel() for p in trainable),
            len(every),
            sum(p.numel() for p in every),
        )
