"""Epoch aggregation of the per-step gradient statistics: the mean and population variance of each
statistic of each parameter tensor across the epoch's recorded steps (NaN/Inf steps skipped), stored
as ``epoch_scalars()`` rows with ``agg`` ``"mean"`` and ``"var"``. Shared by both monitors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bbdecoder.monitor.grad_stats import EpochAccumulator
from bbdecoder.store.vocabulary import AGG_MEAN, AGG_VAR, GRAD_STATS

EpochRow = tuple[int, int, int, str, float]
"""``(epoch, series_id, stat_id, agg, value)``, as ``RunWriter.add_epoch_scalars`` takes them."""


class EpochAggregates:
    """The running aggregates of ``n_series`` parameter tensors over the open epoch."""

    def __init__(self, n_series: int) -> None:
        self.n_series = n_series
        self._acc = EpochAccumulator(n_series, len(GRAD_STATS))

    def update(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Add one step: ``values[i]`` (in :data:`GRAD_STATS` order) belongs to series ``rows[i]``."""
        self._acc.update(rows, values)

    def close(self, epoch: int, series_ids: Sequence[int], stat_ids: Sequence[int]) -> list[EpochRow]:
        """The epoch's rows (series ``i`` stored under ``series_ids[i]``; a statistic without any finite
        value gets no row), then start the next epoch empty."""
        mean, var, count = self._acc.result()
        rows: list[EpochRow] = []
        for i, sid in enumerate(series_ids):
            for j, stat in enumerate(stat_ids):
                if count[i, j] > 0:
                    rows.append((epoch, sid, stat, AGG_MEAN, float(mean[i, j])))
                    rows.append((epoch, sid, stat, AGG_VAR, float(var[i, j])))
        self._acc = EpochAccumulator(self.n_series, len(GRAD_STATS))
        return rows
