"""How the live rules read a step's table, worked out once per table layout.

A step's table (``values[i, j]``: statistic ``stat_ids[j]`` of series ``series_ids[i]``) comes
every step with the same series and statistics. Which columns the rules read, and which
:class:`~bbdecoder.alerts.tensor_rules.TensorState` index each series has, depend only on that
layout, so they are kept here by layout instead of being looked up again each step: on the writer
thread each of those NumPy lookups held the GIL a few microseconds, every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bbdecoder.alerts.tensor_rules import TensorState
from bbdecoder.store import vocabulary as V

__all__ = ["TablePlan", "TablePlans", "all_finite"]

GRAD_NORM = V.L2
RATIO = V.UPDATE_RATIO
DEAD = V.DEAD_FRACTION

_MAX_PLANS = 64
"""Layouts kept at most (a run has a handful: gradients, ratios, per-sample); beyond, start over."""


@dataclass
class TablePlan:
    """One table layout: the column of each statistic, the statistics a per-tensor rule reads
    (norms, ratios), whether a dead-unit column is there; and, once asked, the state index of each
    series (``None``: one series has no parameter name) and whether no series comes twice."""

    columns: dict[str, int]
    watched: tuple[str, ...]
    dead: bool
    looked_up: bool = False
    index: np.ndarray | None = None
    distinct: bool = False


class TablePlans:
    """The :class:`TablePlan` of each table layout seen, and the series -> state index table."""

    def __init__(self, tensors: TensorState) -> None:
        self._tensors = tensors
        self._state_of_series = np.full(0, -1, dtype=np.int64)  # series_id -> TensorState index
        self._plans: dict[tuple[bytes, tuple[int, ...]], TablePlan] = {}

    @staticmethod
    def _key(series_ids: np.ndarray, stat_ids: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]]:
        return np.asarray(series_ids, dtype=np.int64).tobytes(), stat_ids

    def known(self, series_ids: np.ndarray, stat_ids: tuple[int, ...]) -> TablePlan | None:
        """The plan of this layout, if it was made before."""
        return self._plans.get(self._key(series_ids, stat_ids))

    def make(
        self, series_ids: np.ndarray, stat_ids: tuple[int, ...], stat_names: dict[int, str]
    ) -> TablePlan:
        """The plan of a new layout (``stat_names``: every stat id of ``stat_ids`` by name)."""
        columns = {stat_names[s]: j for j, s in enumerate(stat_ids)}
        watched = tuple(stat for stat in (GRAD_NORM, RATIO) if stat in columns)
        plan = TablePlan(columns, watched, DEAD in columns)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[self._key(series_ids, stat_ids)] = plan
        return plan

    def states(
        self, plan: TablePlan, series_ids: np.ndarray, series_names: dict[int, tuple[int, str]]
    ) -> np.ndarray | None:
        """The state index of each of ``series_ids`` (the plan's layout), ``None`` when one has no
        parameter name (``series_names``: ``series_id -> (layer_id, param)``); new tensors get
        fresh state the first time."""
        if not plan.looked_up:
            plan.index, plan.looked_up = self._lookup(series_ids, series_names), True
            if plan.index is not None:
                plan.index.flags.writeable = False  # shared by every step of this layout
                plan.distinct = len(set(plan.index.tolist())) == len(plan.index)
        return plan.index

    def _lookup(self, series_ids: np.ndarray, series_names: dict[int, tuple[int, str]]) -> np.ndarray | None:
        ids = np.asarray(series_ids, dtype=np.int64)
        lut = self._state_of_series
        if len(ids) and ids.max() >= len(lut):
            lut = self._state_of_series = np.concatenate(
                [lut, np.full(2 * int(ids.max()) + 1 - len(lut), -1)]
            )
        index = lut[ids]
        for at in np.flatnonzero(index < 0):
            key = series_names[int(ids[at])]
            if key[1] == "":
                return None
            lut[ids[at]] = index[at] = self._tensors.position(key)
        return index


def all_finite(values: np.ndarray) -> bool:
    """Whether every element of ``values`` is finite."""
    return int(np.count_nonzero(np.isfinite(values))) == values.size
