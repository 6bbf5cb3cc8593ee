"""The per-epoch activation rows of a watched layer, from its probe's state on the host: the same
statistics, ``param ""`` and ``dead_units`` events for the PyTorch and the Keras monitor.

State (see :data:`bbdecoder.monitor.probe_state.ACTIVATION_STATE`): the per-channel maximum, the
saturated and total element counts, the summed variance across channels of the channel means, and
the number of forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bbdecoder.store import vocabulary as V


@dataclass
class ProbeEpoch:
    """One watched layer's epoch, read back to the host."""

    layer_id: int
    name: str  # the layer's display name
    channel_max: np.ndarray  # (C,)
    saturated: float
    total: float
    channel_var: float  # summed over forwards
    forwards: float
    threshold: float
    count_dead: bool  # dead units mean something here (rectifiers, or a layer the user named)
    has_saturation: bool  # the layer has a saturation test


def store_activation_epoch(
    writer: Any, states: list[ProbeEpoch], step: int, epoch: int
) -> dict[int, np.ndarray]:
    """Write the rows (and a ``dead_units`` event per layer with dead units) of every layer that
    ran a forward; returns ``{layer_id: dead channel indices}`` of the layers that count dead units."""
    ids = {name: writer.stat_id(name) for name in V.ACTIVATION_STATS}
    rows, dead_by_layer = [], {}
    for s in states:
        if s.forwards == 0:
            continue
        sid = writer.series_id(s.layer_id, V.ACTIVATION_PARAM)
        saturated = s.saturated / s.total if s.has_saturation and s.total else float("nan")
        stats: list[tuple[str, float]] = [
            (V.SATURATED_FRACTION, saturated),
            (V.CHANNEL_VAR, s.channel_var / s.forwards),
        ]
        if s.count_dead:
            dead = np.flatnonzero(s.channel_max <= s.threshold)
            dead_by_layer[s.layer_id] = dead
            c = s.channel_max.size
            stats += [(V.DEAD_FRACTION, dead.size / c), (V.DEAD_COUNT, float(dead.size))]
            if dead.size:
                writer.add_event(
                    V.DEAD_UNITS,
                    f"{dead.size} of {c} units dead in [{s.layer_id}] {s.name}",
                    step=step,
                    epoch=epoch,
                    layer_id=s.layer_id,
                    data={"channels": dead.tolist()},
                )
        rows += [(step, epoch, sid, ids[name], float(value)) for name, value in stats]
    writer.add_scalars(rows)
    return dead_by_layer
