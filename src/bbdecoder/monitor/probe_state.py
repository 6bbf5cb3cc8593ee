"""Probes declare their state and how each part merges across processes (the torchmetrics pattern).

A probe lists its state tensors in ``STATE`` as ``{attribute: reduction}`` with a reduction from
:data:`REDUCTIONS`; :func:`merge_states` then merges any set of probes across ranks with one
collective per reduction kind, whatever the probes are (the activation probes, a probe a user
writes). Attributes that are ``None`` (state not allocated yet) are left out on every rank alike.

- ``sum`` / ``max`` / ``min``: elementwise over ranks;
- ``mean``: the elementwise mean over ranks;
- ``cat``: the ranks' tensors concatenated along dim 0, in rank order (sizes may differ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

import torch

REDUCTIONS = ("sum", "max", "min", "mean", "cat")

ACTIVATION_STATE: dict[str, str] = {
    "max": "max",
    "saturated": "sum",
    "total": "sum",
    "channel_var": "sum",
    "forwards": "sum",
}
"""The state of an activation probe (both monitors): a unit is dead only when it is dead on every
rank (``max``), counts and sums add up."""


class StatefulProbe:
    """Base of a probe with declared state, merged across ranks by
    :meth:`bbdecoder.RankSync.reduce_probes` without knowing the probe.

    A subclass sets ``STATE = {attribute: reduction}`` (a reduction from :data:`REDUCTIONS`) and
    keeps those attributes as tensors of any shape and dtype, or ``None`` until allocated. Update
    them in place (``torch.maximum(self.high, y, out=self.high)``) so that a hook traced by
    ``torch.compile`` keeps seeing the same tensors."""

    STATE: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        bad = {name: r for name, r in cls.STATE.items() if r not in REDUCTIONS}
        if bad:
            raise TypeError(f"{cls.__name__}.STATE: unknown reductions {bad}; use one of {REDUCTIONS}")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The allocated state, ``{attribute: tensor}`` in ``STATE`` order."""
        found = {name: getattr(self, name, None) for name in self.STATE}
        return {name: t for name, t in found.items() if isinstance(t, torch.Tensor)}

    def load_state(self, merged: dict[str, torch.Tensor]) -> None:
        """Take merged values: written in place where the shape is unchanged (a compiled hook keeps
        its tensors), else the attribute is replaced (``cat``)."""
        for name, value in merged.items():
            current = getattr(self, name)
            if current.shape == value.shape:
                current.copy_(value.to(current.dtype))
            else:
                setattr(self, name, value.to(current.dtype))


AllReduce = Callable[[torch.Tensor, str], torch.Tensor]
"""``(flat float64 tensor, "sum" | "max" | "min") -> the reduced tensor`` (same shape)."""
AllGather = Callable[[torch.Tensor], list[torch.Tensor]]
"""``tensor -> every rank's tensor, in rank order`` (shapes may differ)."""


def merge_states(
    probes: Sequence[StatefulProbe] | Iterable[StatefulProbe],
    all_reduce: AllReduce,
    all_gather: AllGather,
    world_size: int,
) -> None:
    """Merge every probe's declared state across ranks, in place: one ``all_reduce`` per reduction
    kind present (all tensors of that kind flattened into one float64 vector), one ``all_gather``
    per ``cat`` tensor. Every rank must pass the same probes in the same order."""
    items = [
        (probe, name, t, probe.STATE[name]) for probe in probes for name, t in probe.state_tensors().items()
    ]
    merged: dict[tuple[int, str], torch.Tensor] = {}
    for reduction in ("sum", "max", "min", "mean"):
        group = [(p, n, t) for p, n, t, r in items if r == reduction]
        if not group:
            continue
        flat = torch.cat([t.detach().reshape(-1).double() for _, _, t in group])
        out = all_reduce(flat, "sum" if reduction == "mean" else reduction)
        if reduction == "mean":
            out = out / world_size
        pos = 0
        for p, n, t in group:
            merged[(id(p), n)] = out[pos : pos + t.numel()].reshape(t.shape).to(t.device)
            pos += t.numel()
    for p, n, t, r in items:
        if r == "cat":
            merged[(id(p), n)] = torch.cat([part.to(t.device) for part in all_gather(t.detach())])
    for probe in {id(p): p for p, _, _, _ in items}.values():
        probe.load_state({n: merged[(id(probe), n)] for n in probe.state_tensors()})
