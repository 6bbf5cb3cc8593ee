"""RunWriter's bounded in-memory buffer and its failure policy.

The rows wait here until a flush writes them; while the store cannot be written they stay (up to
``max_buffer_bytes``, about: beyond it the oldest steps are dropped whole), and the warnings say
when writing failed, when rows were dropped and when the store is writable again.
"""

from __future__ import annotations

import sqlite3
import time
import warnings
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from bbdecoder.store.schema import StoreWriteWarning

__all__ = ["RowBuffer", "ScalarRow", "table_rows"]

ScalarRow = tuple[int, int, int, int, float]
"""``(step, epoch, series_id, stat_id, value)``."""


def table_rows(
    step: int, epoch: int, series_ids: np.ndarray, stat_ids: Sequence[int], values: np.ndarray
) -> list[ScalarRow]:
    """The rows of one step's table ``values[i, j]`` (statistic ``stat_ids[j]`` of series
    ``series_ids[i]``), series by series."""
    n, k = values.shape
    sids = np.repeat(np.asarray(series_ids, dtype=np.int64), k).tolist()
    flat = np.asarray(values, dtype=np.float64).ravel().tolist()
    return list(zip(repeat(step), repeat(epoch), sids, list(stat_ids) * n, flat, strict=False))


_ROW_BYTES = 120  # a rough size of one buffered row tuple, for the memory bound
_ENVIRONMENT_ERRORS = (sqlite3.OperationalError, OSError)


def _is_write_failure(err: BaseException) -> bool:
    """A failure of the environment (full disk, read-only or vanished folder, I/O error, locked
    file), not of the rows: the rows are kept and written later."""
    return isinstance(err, _ENVIRONMENT_ERRORS) or type(err) is sqlite3.DatabaseError


class RowBuffer:
    """The buffered rows of a :class:`~bbdecoder.store.writer.RunWriter`, what a failed write does
    to them (they stay, within ``max_buffer_bytes``) and what a successful one does (they go)."""

    path: Path
    max_buffer_bytes: int

    def _init_buffers(self) -> None:
        # catalog rows (always safe to write) and data rows, all written by the next successful flush
        self._new_series: list[tuple[int, int, str]] = []
        self._new_stats: list[tuple[int, str]] = []
        self._layers: list[tuple[int, str, str, int, str | None]] | None = None
        self._meta: dict[str, str] = {}
        self._artifacts: dict[str, tuple[str, str]] = {}
        self._relabels: list[tuple[int, int, int]] = []
        self._steps: list[tuple[int, int, float, float | None]] = []
        self._loss_updates: list[tuple[float, int]] = []  # (loss, step) of steps already written
        self._late_losses: dict[int, float] = {}  # losses given before their step row was buffered
        self._scalars: list[ScalarRow] = []
        self._epoch_scalars: list[tuple[int, int, int, str, float]] = []
        self._histograms: list[tuple[int, int, int, str, float, float, int, bytes]] = []
        self._events: list[tuple[int | None, int | None, float, str, int | None, str | None, str, str]] = []
        self._blobs: list[tuple[int, int | None, int | None, float, str, str, int | None, str, bytes]] = []
        self._failing: BaseException | None = None
        self._failed_at = 0.0
        self._warned_drop = False
        self._dropped_steps: list[int] = []
        self._checkpoint_due = False

    @property
    def _data_buffers(self) -> tuple[list[Any], ...]:
        return (
            self._steps,
            self._scalars,
            self._epoch_scalars,
            self._histograms,
            self._events,
            self._loss_updates,
        )

    @property
    def pending(self) -> int:
        """Rows (and blobs) buffered and not yet written."""
        catalog = len(self._new_series) + len(self._new_stats) + len(self._meta) + len(self._artifacts)
        catalog += len(self._relabels) + (self._layers is not None)
        return catalog + len(self._blobs) + sum(len(x) for x in self._data_buffers)

    @property
    def failing(self) -> bool:
        """True while the store cannot be written (rows are being kept in memory)."""
        return self._failing is not None

    def _catalog_pending(self) -> bool:
        return bool(
            self._new_series or self._new_stats or self._meta or self._artifacts or self._layers is not None
        )

    def _written(self, rows: bool) -> None:
        if self._failing is not None:
            self._warn(
                f"bbdecoder: the run store {self.path} is writable again; the buffered rows were written",
                stacklevel=4,
            )
            self._failing, self._warned_drop = None, False
        self._new_series.clear()
        self._new_stats.clear()
        self._meta.clear()
        self._artifacts.clear()
        self._layers = None
        self._blobs.clear()
        if not rows:
            return
        self._relabels.clear()
        self._dropped_steps.clear()
        for buffer in self._data_buffers:
            buffer.clear()

    def _failed(self, err: BaseException) -> None:
        first = self._failing is None
        self._failing, self._failed_at = err, time.monotonic()
        if first:
            self._warn(
                f"bbdecoder: cannot write the run store {self.path} ({err}); training goes on, the "
                f"rows are kept in memory (up to about {self.max_buffer_bytes // 2**20} MiB) and written "
                "when the store is writable again (free disk space, or make the folder writable)",
                stacklevel=4,
            )
        self._bound_buffer()

    def _buffer_bytes(self) -> int:
        rows = sum(len(x) for x in self._data_buffers)
        return (
            rows * _ROW_BYTES
            + sum(len(b[-1]) for b in self._blobs)
            + sum(len(h[-1]) for h in self._histograms)
        )

    def _bound_buffer(self) -> None:
        """Drop the oldest buffered steps (whole: their step row, scalars, histograms and events) and
        the oldest blobs until the buffer is within ``max_buffer_bytes``."""
        while self._buffer_bytes() > self.max_buffer_bytes:
            if self._blobs:
                self._blobs.pop(0)
            elif self._steps:
                cut = self._steps[max(len(self._steps) // 10, 1) - 1][0]
                self._dropped_steps += [r[0] for r in self._steps if r[0] <= cut]
                self._steps[:] = [r for r in self._steps if r[0] > cut]
                self._scalars[:] = [r for r in self._scalars if r[0] > cut]
                self._histograms[:] = [r for r in self._histograms if r[0] > cut]
                self._events[:] = [r for r in self._events if r[0] is None or r[0] > cut]
            elif self._events or self._epoch_scalars:
                for buffer in (self._events, self._epoch_scalars):
                    del buffer[: max(len(buffer) // 10, 1)]
            else:
                break
            if not self._warned_drop:
                self._warned_drop = True
                self._warn(
                    f"bbdecoder: the run store {self.path} is still not writable and the buffer is full: "
                    "the oldest buffered steps are dropped (a 'store_gap' event will record them)",
                    stacklevel=5,
                )

    def _warn(self, message: str, stacklevel: int) -> None:
        """How a write failure or recovery is reported (the writer thread defers it, see
        :mod:`bbdecoder.store.background`)."""
        warnings.warn(message, StoreWriteWarning, stacklevel=stacklevel + 1)
