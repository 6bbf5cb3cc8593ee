"""Threshold pruning of dead units with ``torch.nn.utils.prune`` masks.

Pruning is an explicit user action and, by design, the one thing that changes the model: it adds
``<name>_orig`` parameters, ``<name>_mask`` buffers and a forward pre-hook per pruned tensor (that is
how ``torch.nn.utils.prune`` works; the optimizer keeps updating the same ``_orig`` parameters).
:func:`make_permanent` folds the masks into plain parameters and removes those hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune


@dataclass
class PrunedUnits:
    """Units of one watched layer that were found dead, and where they were masked."""

    layer_id: int
    layer: str
    channels: list[int]
    pruned_module: str
    pruned_params: list[str]


@dataclass
class PruneReport:
    """What :meth:`Analyzer.prune_dead` pruned, and the evaluation before/after (when given)."""

    entries: list[PrunedUnits] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def total(self) -> int:
        return sum(len(e.channels) for e in self.entries)

    def __str__(self) -> str:
        lines = [f"pruned {self.total} dead unit(s)"]
        for e in self.entries:
            lines.append(
                f"  [{e.layer_id}] {e.layer}: channels {e.channels} masked in {e.pruned_module} "
                f"({', '.join(e.pruned_params)})"
            )
        if self.accuracy_before is not None:
            lines.append(f"  evaluation before: {self.accuracy_before:.6g}, after: {self.accuracy_after:.6g}")
        return "\n".join(lines)


def output_channels(module: nn.Module) -> int | None:
    """Number of output channels of a module with a ``weight`` (dim 0 of the weight), else ``None``."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
        return int(weight.shape[0])
    return None


def mask_channels(module: nn.Module, channels: list[int]) -> list[str]:
    """Zero output ``channels`` of ``module`` (its ``weight`` rows and ``bias`` entries) with prune
    masks; returns the names of the tensors masked. Masks combine with earlier prunings."""
    pruned = []
    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        mask = torch.ones_like(tensor)
        mask[torch.as_tensor(channels, dtype=torch.long, device=tensor.device)] = 0
        prune.custom_from_mask(module, name, mask)
        pruned.append(name)
    return pruned


def make_permanent(modules: list[tuple[nn.Module, str]]) -> None:
    """Fold the masks of ``(module, tensor name)`` pairs into plain parameters (removes the hooks)."""
    for module, name in modules:
        if prune.is_pruned(module) and hasattr(module, name + "_mask"):
            prune.remove(module, name)
