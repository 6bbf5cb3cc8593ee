"""A stored run as sink input: per step, every value under its sink name (export after the fact)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bbdecoder.sinks.names import metric_name
from bbdecoder.store.reader import RunReader, open_run


def stored_steps(run: str | Path | RunReader) -> Iterator[tuple[int, dict[str, float], float]]:
    """``(step, {name: value}, time)`` for every step with a value, ascending; NaN stays NaN."""
    reader = run if isinstance(run, RunReader) else open_run(run)
    try:
        with reader.snapshot():
            scalars = reader.scalars()
            steps = reader.steps()
    finally:
        if not isinstance(run, RunReader):
            reader.close()
    times = dict(zip(steps["step"].astype(int), steps["time"].astype(float), strict=True))
    by_step: dict[int, dict[str, float]] = {}
    keys = {
        key: metric_name(key[0], int(key[1]), str(key[2]), str(key[3]))
        for key in scalars[["stat", "layer_id", "layer", "param"]].drop_duplicates().itertuples(index=False)
    }
    for step, stat, layer_id, layer, param, value in zip(
        scalars["step"], scalars["stat"], scalars["layer_id"], scalars["layer"], scalars["param"],
        scalars["value"], strict=True,
    ):  # fmt: skip
        by_step.setdefault(int(step), {})[keys[(stat, layer_id, layer, param)]] = float(value)
    for row in steps.itertuples():
        if row.loss is not None and not np.isnan(row.loss):
            by_step.setdefault(int(row.step), {})["loss"] = float(row.loss)
    fallback = min(times.values(), default=0.0)
    for step in sorted(by_step):
        yield step, by_step[step], times.get(step, fallback)
