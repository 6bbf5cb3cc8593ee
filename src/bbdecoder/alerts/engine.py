"""The alert engine: feeds recorded rows through the rules, stores events, warns once per kind."""

from __future__ import annotations

import math
import statistics
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from bbdecoder.alerts import rules as R
from bbdecoder.alerts.rules import Alert, AlertConfig, Row
from bbdecoder.alerts.table_kernel import table_alerts
from bbdecoder.alerts.table_plans import DEAD, GRAD_NORM, RATIO, TablePlans, all_finite
from bbdecoder.alerts.tensor_rules import (
    StepValues,
    TensorState,
    grad_norm_alerts,
    ratio_alerts,
    weights_by_layer,
)
from bbdecoder.store.writer import RunWriter, ScalarRow, table_rows

WATCHED = frozenset({GRAD_NORM, RATIO, DEAD})
"""The statistics the rules read (besides any non-finite value)."""


class AlertWarning(RuntimeWarning):
    """A training anomaly detected by :class:`AlertEngine` (raised once per alert kind)."""


class AlertEngine:
    """Evaluates the alert rules as statistics are recorded.

    Feed it with :meth:`observe` (rows of one or more steps) and :meth:`observe_loss`, or let it watch
    a :class:`~bbdecoder.store.RunWriter` with :meth:`attach` (then every row the writer receives is
    evaluated and every alert becomes an event in the same store). Alerts are returned, kept in
    :attr:`alerts`, and raised as an :class:`AlertWarning` once per kind (``warn=False``: never).
    """

    def __init__(self, config: AlertConfig | None = None, *, warn: bool = True) -> None:
        self.config = config or AlertConfig()
        self.warn = warn
        self.alerts: list[Alert] = []
        self._writer: RunWriter | None = None
        self._warned: set[str] = set()
        self._tensors = TensorState(self.config.explode_window)  # the per-tensor rules' state
        self._plans = TablePlans(self._tensors)  # how a step's table is read, by its layout
        self._active: set[tuple[str, int, str]] = set()
        self._dead_min: dict[int, float] = {}
        self._losses: deque[float] = deque(maxlen=self.config.loss_window)
        self._loss_peak = 0.0
        self._last_loss_step: int | None = None
        self._first_step: int | None = None
        self._layer_names: dict[int, str] | None = None
        self._series_names: dict[int, tuple[int, str]] = {}
        self._stat_names: dict[int, str] = {}
        self._watched: set[int] = set()
        self._watched_for = -1

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, writer: RunWriter) -> AlertEngine:
        """Evaluate every row ``writer`` receives from now on and store alerts as its events.

        Wraps the writer's ``add_scalars``, ``add_step_scalars``, ``add_step`` and ``set_loss`` (this
        writer object only; a loss given with ``analyzer.log(loss=...)`` reaches the writer through
        ``set_loss``), so the live rules see the losses a replay of the store sees. A step's table
        (``add_step_scalars``) is judged from its arrays; its rows still pass through
        ``add_scalars`` for the store and any other watcher. Returns self.
        """
        if self._writer is not None:
            raise RuntimeError("this AlertEngine is already attached to a writer")
        self._writer = writer
        add_scalars, add_step, set_loss = writer.add_scalars, writer.add_step, writer.set_loss
        add_table = writer.add_step_scalars
        epochs: dict[str, int] = {"last": 0}
        in_table = threading.local()  # per thread: a user's rows on another thread are still judged
        # the rules' state is one: the writer thread's jobs and a user's log() take turns
        rules = writer.watchers_lock

        def scalars_then_alerts(rows: list[ScalarRow]) -> None:
            add_scalars(rows)
            if getattr(in_table, "active", False):
                return  # a table's rows: judged from its arrays
            with rules:
                self._observe_rows(writer, rows)

        def step_then_alerts(step: int, epoch: int, loss: float | None) -> None:
            add_step(step, epoch, loss)
            epochs["last"] = epoch
            if loss is not None:
                with rules:
                    self._loss_once(step, epoch, loss)

        def loss_then_alerts(step: int, loss: float) -> None:
            set_loss(step, loss)
            with rules:
                self._loss_once(step, epochs["last"], loss)

        def table_then_alerts(
            step: int, epoch: int, series_ids: np.ndarray, stat_ids: Sequence[int], values: np.ndarray
        ) -> None:
            in_table.active = True
            try:
                add_table(step, epoch, series_ids, stat_ids, values)
            finally:
                in_table.active = False
            with rules:
                self._observe_table(writer, step, epoch, series_ids, stat_ids, values)

        writer.add_scalars = scalars_then_alerts  # type: ignore[method-assign]
        writer.add_step_scalars = table_then_alerts  # type: ignore[method-assign]
        writer.add_step = step_then_alerts  # type: ignore[method-assign]
        writer.set_loss = loss_then_alerts  # type: ignore[method-assign]
        return self

    def _loss_once(self, step: int, epoch: int, loss: float) -> None:
        # a step's loss can come twice (backward_propagation(loss) and log(loss=...)): judged once
        if self._last_loss_step is None or step > self._last_loss_step:
            self._last_loss_step = step
            self.observe_loss(step, epoch, float(loss))

    def _judged(self, writer: RunWriter, rows: list[ScalarRow]) -> list[ScalarRow]:
        """The rows some rule reads: the watched statistics, and any non-finite value (a step has
        six statistics per tensor and the rules read one, so naming every row would cost more
        than the rules)."""
        if self._watched_for != len(writer._stats):
            self._watched_for = len(writer._stats)
            self._watched = {sid for name, sid in writer._stats.items() if name in WATCHED}
        watched, finite = self._watched, math.isfinite
        return [r for r in rows if r[3] in watched or not finite(r[4])]

    def _refresh_names(self, writer: RunWriter) -> None:
        # ids are only ever added, so the inverse maps are rebuilt only when they grew
        if len(self._series_names) != len(writer._series):
            self._series_names = {sid: key for key, sid in writer._series.items()}
        if len(self._stat_names) != len(writer._stats):
            self._stat_names = {sid: name for name, sid in writer._stats.items()}

    def _named(self, writer: RunWriter, rows: Iterable[ScalarRow]) -> list[Row]:
        self._refresh_names(writer)
        series, stats = self._series_names, self._stat_names
        if self._layer_names is None or any(series[r[2]][0] not in self._layer_names for r in rows):
            self._layer_names = writer.layer_names()
        names = self._layer_names
        out = []
        for step, epoch, series_id, stat_id, value in rows:
            layer_id, param = series[series_id]
            out.append((step, epoch, layer_id, names.get(layer_id, ""), param, stats[stat_id], value))
        return out

    # -- evaluation ---------------------------------------------------------------------------
    def observe(self, rows: Iterable[Row]) -> list[Alert]:
        """Evaluate rows ``(step, epoch, layer_id, layer, param, stat, value)``; returns new alerts.

        Rows of one step should come together (the vanishing rule compares a step's norms)."""
        by_step: dict[tuple[int, int], list[Row]] = {}
        for row in rows:
            by_step.setdefault((int(row[0]), int(row[1])), []).append(row)
        new: list[Alert] = []
        for (step, _epoch), part in sorted(by_step.items()):
            if self._first_step is None:
                self._first_step = step
            norms = [r for r in part if r[5] == GRAD_NORM and r[4] != ""]
            ratios = [r for r in part if r[5] == RATIO and r[4] != ""]
            new += self._nonfinite(part)
            new += grad_norm_alerts(self._tensors, self.config, StepValues.from_rows(self._tensors, norms))
            new += ratio_alerts(
                self._tensors,
                self.config,
                StepValues.from_rows(self._tensors, ratios),
                step,
                self._first_step,
            )
            new += self._dead([r for r in part if r[5] == DEAD])
        return self._emit(new)

    def _observe_table(
        self,
        writer: RunWriter,
        step: int,
        epoch: int,
        series_ids: np.ndarray,
        stat_ids: Sequence[int],
        values: np.ndarray,
    ) -> None:
        """Judge one step's table ``values[i, j]`` (statistic ``stat_ids[j]`` of series
        ``series_ids[i]``) as :meth:`observe` judges its rows, from the arrays: no row is built
        unless an alert fires. A table with a non-finite value, a dead-unit column or a series
        without a parameter name goes through the rows."""
        if not len(series_ids):
            return
        stats = tuple(stat_ids)
        plan = self._plans.known(series_ids, stats)
        if plan is None:
            self._refresh_names(writer)
            plan = self._plans.make(series_ids, stats, self._stat_names)
        simple = not plan.dead and all_finite(values)
        index = None
        if simple and plan.watched:
            index = self._plans.states(plan, series_ids, self._series_names)
        if not simple or (plan.watched and index is None):
            self._observe_rows(writer, table_rows(step, epoch, series_ids, stat_ids, values))
            return
        if index is None:
            return  # finite, and no statistic a rule reads: the rows would not be judged either
        if self._first_step is None:
            self._first_step = step
        new: list[Alert] = []
        for stat in plan.watched:
            at = plan.columns[stat]
            fired = None
            if plan.distinct:  # one C call where the extension is built
                row = partial(self._table_row, writer, step, epoch, series_ids, stat, values, at)
                fired = table_alerts(
                    self._tensors, self.config, stat, values, at, index, step, self._first_step, row
                )
            if fired is None:
                column = np.ascontiguousarray(values[:, at], dtype=np.float64)
                step_values = self._table_values(
                    writer, step, epoch, series_ids, stat, index, column, plan.distinct
                )
                if stat == GRAD_NORM:
                    fired = grad_norm_alerts(self._tensors, self.config, step_values)
                else:
                    fired = ratio_alerts(self._tensors, self.config, step_values, step, self._first_step)
            new += fired
        self._emit(new)

    def _observe_rows(self, writer: RunWriter, rows: list[ScalarRow]) -> None:
        judged = self._judged(writer, rows)
        if judged:
            self.observe(self._named(writer, judged))

    def _table_values(
        self, writer: RunWriter, step: int, epoch: int, series_ids: np.ndarray, stat: str,
        index: np.ndarray, column: np.ndarray, distinct: bool,
    ) -> StepValues:  # fmt: skip
        """One statistic of a finite table, for the per-tensor rules (``distinct``: no series twice)."""
        series = self._series_names
        row = partial(self._table_row, writer, step, epoch, series_ids, stat, column.reshape(-1, 1), 0)

        def weights() -> dict[tuple[int, str], float]:
            keys = [series[int(s)] for s in series_ids]
            return weights_by_layer(
                (lid, param, float(v)) for (lid, param), v in zip(keys, column, strict=True)
            )

        return StepValues(index, column, row, weights, distinct=distinct, finite=True)

    def _table_row(
        self, writer: RunWriter, step: int, epoch: int, series_ids: np.ndarray, stat: str,
        values: np.ndarray, column: int, i: int,
    ) -> Row:  # fmt: skip
        """Row ``i`` of a table's statistic in ``values[:, column]``, for an alert."""
        layer_id, param = self._series_names[int(series_ids[i])]
        if self._layer_names is None or layer_id not in self._layer_names:
            self._layer_names = writer.layer_names()
        return (
            step,
            epoch,
            layer_id,
            self._layer_names.get(layer_id, ""),
            param,
            stat,
            float(values[i, column]),
        )

    def observe_loss(self, step: int, epoch: int, loss: float) -> list[Alert]:
        """Evaluate the loss of one step; returns the new alerts (at most one)."""
        c, new = self.config, list[Alert]()
        if c.loss and math.isfinite(loss):
            history = self._losses
            if len(history) >= c.loss_min_history:
                values = list(history)
                median = statistics.median(values)
                self._loss_peak = max(self._loss_peak, abs(median))
                scale = max(
                    1.4826 * statistics.median([abs(v - median) for v in values]),
                    c.loss_min_scale * abs(median),
                    c.loss_floor * self._loss_peak,
                    1e-12,
                )
                limit = median + c.loss_factor * scale
                if loss > limit:
                    message = (
                        f"loss spike at step {step}: {loss:.4g} against a median of {median:.4g} over the "
                        f"previous {len(values)} steps (limit {limit:.4g})"
                    )
                    new.append(Alert(R.LOSS_SPIKE, step, epoch, None, "", "", loss, limit, message))
            history.append(loss)
        return self._emit(new)

    def _onset(self, kind: str, layer_id: int, param: str, bad: bool) -> bool:
        key = (kind, layer_id, param)
        if bad and key not in self._active:
            self._active.add(key)
            return True
        if not bad:
            self._active.discard(key)
        return False

    def _nonfinite(self, rows: list[Row]) -> list[Alert]:
        if not self.config.nonfinite:
            return []
        bad = [r for r in rows if r[4] != "" and r[5] != RATIO and not math.isfinite(r[6])]
        if not bad:
            return []
        step, epoch, layer_id, layer, param = bad[0][:5]
        message = f"non-finite gradient at step {step}: [{layer_id}] {layer} ({param})"
        affected = sorted({r[4] for r in bad})
        return [
            Alert(R.NONFINITE, step, epoch, layer_id, layer, param, bad[0][6], math.nan, message,
                  {"affected": affected})
        ]  # fmt: skip

    def _dead(self, rows: list[Row]) -> list[Alert]:
        c, new = self.config, list[Alert]()
        if not c.dead_units:
            return new
        for step, epoch, layer_id, layer, _param, _stat, value in rows:
            if not math.isfinite(value):
                continue
            lowest = min(self._dead_min.get(layer_id, value), value)
            self._dead_min[layer_id] = lowest
            if self._onset(R.DEAD_RISING, layer_id, "", value - lowest >= c.dead_rise):
                message = (
                    f"dead units rising at step {step} (epoch {epoch}): [{layer_id}] {layer} has "
                    f"{value:.1%} dead units, up from {lowest:.1%}"
                )
                new.append(
                    Alert(
                        R.DEAD_RISING, step, epoch, layer_id, layer, "", value, lowest + c.dead_rise, message
                    )
                )
        return new

    def _emit(self, new: list[Alert]) -> list[Alert]:
        for alert in new:
            self.alerts.append(alert)
            if self._writer is not None:
                self._writer.add_event(
                    alert.kind,
                    alert.message,
                    step=alert.step,
                    epoch=alert.epoch,
                    layer_id=alert.layer_id,
                    param=alert.param or None,
                    data={"value": alert.value, "threshold": alert.threshold, "rule": "alert", **alert.data},
                )
            if self.warn and alert.kind not in self._warned:
                self._warned.add(alert.kind)
                # a threaded writer may run the rules on its thread: it raises the warning on the
                # training thread
                warn = getattr(self._writer, "warn", None)
                if warn is not None:
                    warn(alert.message, AlertWarning, stacklevel=5)
                else:
                    warnings.warn(alert.message, AlertWarning, stacklevel=4)
        return new


def evaluate_run(run: str | Path, config: AlertConfig | None = None, *, warn: bool = False) -> list[Alert]:
    """Replay a stored run through the rules (read-only; nothing is written): every alert, in order.

    Non-finite gradients are included (``config.nonfinite`` is switched on for the replay)."""
    from dataclasses import replace

    from bbdecoder.store.reader import open_run

    engine = AlertEngine(replace(config or AlertConfig(), nonfinite=True), warn=warn)
    with open_run(run) as reader:
        scalars = reader.scalars()
        losses = reader.steps().dropna(subset=["loss"]).set_index("step")
    rows = list(scalars.itertuples(index=False, name=None))
    steps = sorted({int(r[0]) for r in rows} | {int(s) for s in losses.index})
    by_step: dict[int, list[Row]] = {}
    for row in rows:
        by_step.setdefault(int(row[0]), []).append(row)
    for step in steps:
        engine.observe(by_step.get(step, []))
        if step in losses.index:
            engine.observe_loss(step, int(losses.loc[step, "epoch"]), float(losses.loc[step, "loss"]))
    return engine.alerts
