"""Epoch aggregation of the per-step gradient statistics: the mean and population variance of each
statistic of each parameter tensor across the epoch's recorded steps (NaN/Inf steps skipped), stored
as ``epoch_scalars()`` rows with ``agg`` ``"mean"`` and ``"var"``. Shared by both monitors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bbdecoder.store.vocabulary import AGG_MEAN, AGG_VAR, GRAD_STATS

EpochRow = tuple[int, int, int, str, float]
"""``(epoch, series_id, stat_id, agg, value)``, as ``RunWriter.add_epoch_scalars`` takes them."""


class EpochAccumulator:
    """Mean and population variance across iterations (Welford, float64, NaN/Inf skipped)."""

    def __init__(self, n_series: int, n_stats: int) -> None:
        self.count = np.zeros((n_series, n_stats))
        self.mean = np.zeros((n_series, n_stats))
        self.m2 = np.zeros((n_series, n_stats))
        self._every_row = np.arange(n_series, dtype=np.int64).tobytes()

    def update(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Add one step: ``values[i]`` belongs to series ``rows[i]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.tobytes() == self._every_row and np.count_nonzero(np.isfinite(values)) == values.size:
            # every series, in order, all finite (the common step): the same update on views
            self.count += 1
            delta = values - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (values - self.mean)
            return
        finite = np.isfinite(values)
        count = self.count[rows] + finite
        safe = np.where(finite, values, 0.0)
        delta = np.where(finite, safe - self.mean[rows], 0.0)
        mean = self.mean[rows] + np.divide(delta, count, out=np.zeros_like(delta), where=count > 0)
        self.m2[rows] += delta * np.where(finite, safe - mean, 0.0)
        self.mean[rows] = mean
        self.count[rows] = count

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mean, var, count)``, each ``(n_series, n_stats)``; NaN where no finite value was seen."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.mean, np.nan)
            var = np.where(self.count > 0, self.m2 / self.count, np.nan)
        return mean, var, self.count.copy()


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
