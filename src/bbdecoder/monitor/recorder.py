"""The recorder both monitors share: what a step, an epoch and a weight snapshot become in the run
store. The framework-specific capture (PyTorch hooks and fused device statistics in
:mod:`bbdecoder.monitor.capture`, the Keras optimizer shadow in :mod:`bbdecoder.keras.monitor_capture`)
hands it host arrays; the names come from :mod:`bbdecoder.store.vocabulary`.

- a step: the six gradient statistics of each parameter tensor (:data:`GRAD_STATS` order), the loss,
  the update ratios, added to the epoch aggregates; a gradient is non-finite when its ``max_abs``
  is (or when the capture says so), and such a step gets one ``nonfinite_grad`` event naming the first
  affected tensor in backward order, with a :class:`NonFiniteGradientWarning` unless the run uses
  loss scaling (where overflowing steps are expected and skipped);
- an epoch: mean and population variance of every statistic across the epoch's steps
  (:mod:`bbdecoder.monitor.epochs`);
- weights: ``weight_mean``, ``weight_std``, ``weight_l2`` and quantiles, and a histogram on bins fixed
  at the tensor's first snapshot. The one NaN/Inf rule: the range comes from the finite values
  (``1.5 max|W|``), NaN is left out of the counts and +-Inf counts in the end bins, so a diverged
  tensor still shows where its values went.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bbdecoder.monitor.epochs import EpochAggregates
from bbdecoder.monitor.weights import fixed_range, histogram, weight_statistics
from bbdecoder.store import vocabulary as V


def note_progress(writer: Any, next_step: int | None, ended_epoch: int | None) -> None:
    """The steps a monitor ran (``next_step``: the number its next step would get; ``None``: it ran
    none) and the epoch it just ended as store meta: with ``every > 1`` the last steps have no row,
    and a later monitor on the store continues after them (``RunWriter.next_step``)."""
    if next_step is not None:
        writer.set_meta(V.META_NEXT_STEP, str(next_step))
    if ended_epoch is not None:
        writer.set_meta(V.META_LAST_EPOCH, str(ended_epoch))


class NonFiniteGradientWarning(RuntimeWarning):
    """A gradient held NaN or Inf; the message names the first layer in backward order."""


@dataclass
class Series:
    """One recorded parameter tensor."""

    row: int  # its position among the recorder's series
    layer_id: int
    layer: str  # the owner's display name
    name: str  # the parameter's stored name (PyTorch: state_dict name; Keras: layer.variable)
    series_id: int


Rows = Sequence[int] | np.ndarray
"""Series positions (a list or an integer array)."""

FirstBad = Callable[[list[Series]], Series]
"""Picks the first tensor in backward order among the non-finite ones of a step."""


class Recorder:
    """Writes steps, epochs and weight snapshots of ``series`` into ``writer``.

    Args:
        writer: a :class:`~bbdecoder.store.RunWriter` (or a rank's ``NullWriter``).
        series: the recorded tensors, ``series[i].row == i``.
        histogram_bins, quantiles: of the weight snapshots.
        loss_scaled: steps with non-finite gradients are expected (AMP / loss scaling): no warning.
    """

    def __init__(
        self,
        writer: Any,
        series: Sequence[Series],
        *,
        histogram_bins: int,
        quantiles: tuple[float, ...],
        loss_scaled: bool = False,
    ) -> None:
        self.writer = writer
        self.series = list(series)
        self.histogram_bins = histogram_bins
        self.quantiles = quantiles
        self.loss_scaled = loss_scaled
        self.stat_ids = [writer.stat_id(s) for s in V.GRAD_STATS]
        self.ratio_stat = writer.stat_id(V.UPDATE_RATIO)
        self.epochs = EpochAggregates(len(self.series))
        self._hist_ranges: dict[int, tuple[float, float]] = {}
        self._max_abs = V.GRAD_STATS.index(V.MAX_ABS)
        self._series_ids = np.array([s.series_id for s in self.series], dtype=np.int64)

    def step(
        self,
        step: int,
        epoch: int,
        rows: Rows,
        values: np.ndarray | None,
        loss: float | None,
        *,
        first_bad: FirstBad,
        finite: np.ndarray | None = None,
    ) -> list[Series]:
        """Store one step: ``values`` ``(len(rows), 6)`` float64 statistics of ``series[rows[i]]``
        (``None``: gradients not recorded), the loss; ``finite[i]`` is false where the gradient held
        NaN/Inf (default: where its ``max_abs`` is non-finite). Returns the non-finite series."""
        w = self.writer
        index = np.asarray(rows, dtype=np.int64)
        if values is not None:
            w.add_step_scalars(step, epoch, self._series_ids[index], self.stat_ids, values)
            self.epochs.update(index, values)
        w.add_step(step, epoch, loss)
        if finite is None:
            finite = np.ones(len(index), bool) if values is None else np.isfinite(values[:, self._max_abs])
        bad = (
            []
            if np.count_nonzero(finite) == len(index)
            else [self.series[r] for r, ok in zip(index.tolist(), finite, strict=True) if not ok]
        )
        if bad:
            self.nonfinite(step, epoch, bad, first_bad(bad))
        return bad

    def ratios(self, step: int, epoch: int, rows: Rows, values: np.ndarray) -> None:
        """Store the update ratios ``values[i]`` of ``series[rows[i]]``, labelled with ``step``."""
        series_ids = self._series_ids[np.asarray(rows, dtype=np.int64)]
        table = np.asarray(values, dtype=np.float64).reshape(-1, 1)
        self.writer.add_step_scalars(step, epoch, series_ids, [self.ratio_stat], table)

    def nonfinite(self, step: int, epoch: int, bad: list[Series], first: Series) -> None:
        message = (
            f"non-finite gradient at step {step}: first in backward order is layer "
            f"[{first.layer_id}] {first.layer} ({first.name}); {len(bad)} parameter tensor(s) affected"
        )
        self.writer.add_event(
            V.NONFINITE_GRAD,
            message,
            step=step,
            epoch=epoch,
            layer_id=first.layer_id,
            param=first.name,
            data={"affected": [s.name for s in bad]},
        )
        if not self.loss_scaled:
            warnings.warn(message, NonFiniteGradientWarning, stacklevel=6)

    def end_epoch(self, epoch: int) -> None:
        """Store the epoch aggregates of every series and start the next epoch."""
        rows = self.epochs.close(epoch, [s.series_id for s in self.series], self.stat_ids)
        self.writer.add_epoch_scalars(rows)

    def weights(self, step: int, epoch: int, rows: Sequence[int], tensors: Sequence[torch.Tensor]) -> None:
        """Store the weight statistics and histogram of ``series[rows[i]]`` from ``tensors[i]``."""
        w = self.writer
        stat_ids = [w.stat_id(s) for s in V.weight_stat_names(self.quantiles)]
        table = weight_statistics(list(tensors), self.quantiles)
        scalars = []
        for r, tensor, vals in zip(rows, tensors, table, strict=True):
            s = self.series[r]
            scalars += [
                (step, epoch, s.series_id, sid, float(v)) for sid, v in zip(stat_ids, vals, strict=True)
            ]
            if r not in self._hist_ranges:
                self._hist_ranges[r] = fixed_range(tensor)
            lo, hi = self._hist_ranges[r]
            counts = histogram(tensor, lo, hi, self.histogram_bins)
            w.add_histogram(step, epoch, s.series_id, V.WEIGHT_HISTOGRAM, lo, hi, counts)
        w.add_scalars(scalars)
