"""The alert engine: feeds recorded rows through the rules, stores events, warns once per kind."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbdecoder.alerts import rules as R
from bbdecoder.alerts.rules import AlertConfig
from bbdecoder.store import vocabulary as V
from bbdecoder.store.writer import RunWriter, ScalarRow

GRAD_NORM = V.L2
RATIO = V.UPDATE_RATIO
DEAD = V.DEAD_FRACTION
WATCHED = frozenset({GRAD_NORM, RATIO, DEAD})
"""The statistics the rules read (besides any non-finite value)."""


class AlertWarning(RuntimeWarning):
    """A training anomaly detected by :class:`AlertEngine` (raised once per alert kind)."""


@dataclass
class Alert:
    """One alert: ``kind`` (see :data:`bbdecoder.alerts.ALERT_KINDS`), where and when, and why."""

    kind: str
    step: int | None
    epoch: int | None
    layer_id: int | None
    layer: str
    param: str
    value: float
    threshold: float
    message: str
    data: dict[str, Any] = field(default_factory=dict)


Row = tuple[int, int, int, str, str, str, float]
"""``(step, epoch, layer_id, layer, param, stat, value)``, the reader's column order."""


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
        self._norms: dict[tuple[int, str], deque[float]] = {}
        self._peak_median: dict[tuple[int, str], float] = {}
        self._active: set[tuple[str, int, str]] = set()
        self._low_norm: dict[tuple[int, str], int] = {}
        self._had_gradient: set[tuple[int, str]] = set()
        self._low_ratio: dict[tuple[int, str], int] = {}
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

        Wraps the writer's ``add_scalars``, ``add_step`` and ``set_loss`` (this writer object only; a
        loss given with ``analyzer.log(loss=...)`` reaches the writer through ``set_loss``), so the
        live rules see the losses a replay of the store sees. Returns self.
        """
        if self._writer is not None:
            raise RuntimeError("this AlertEngine is already attached to a writer")
        self._writer = writer
        add_scalars, add_step, set_loss = writer.add_scalars, writer.add_step, writer.set_loss
        epochs: dict[str, int] = {"last": 0}

        def scalars_then_alerts(rows: list[ScalarRow]) -> None:
            add_scalars(rows)
            judged = self._judged(writer, rows)
            if judged:
                self.observe(self._named(writer, judged))

        def step_then_alerts(step: int, epoch: int, loss: float | None) -> None:
            add_step(step, epoch, loss)
            epochs["last"] = epoch
            if loss is not None:
                self._loss_once(step, epoch, loss)

        def loss_then_alerts(step: int, loss: float) -> None:
            set_loss(step, loss)
            self._loss_once(step, epochs["last"], loss)

        writer.add_scalars = scalars_then_alerts  # type: ignore[method-assign]
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

    def _named(self, writer: RunWriter, rows: Iterable[ScalarRow]) -> list[Row]:
        # ids are only ever added, so the inverse maps are rebuilt only when they grew
        if len(self._series_names) != len(writer._series):
            self._series_names = {sid: key for key, sid in writer._series.items()}
        if len(self._stat_names) != len(writer._stats):
            self._stat_names = {sid: name for name, sid in writer._stats.items()}
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
            new += self._nonfinite(part)
            new += self._grad_norms(norms)
            new += self._ratios([r for r in part if r[5] == RATIO and r[4] != ""])
            new += self._dead([r for r in part if r[5] == DEAD])
        return self._emit(new)

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

    def _grad_norms(self, rows: list[Row]) -> list[Alert]:
        c, new = self.config, list[Alert]()
        finite = [r[6] for r in rows if math.isfinite(r[6])]
        largest = max(finite, default=0.0)
        weight_norms = {(r[2], r[4].rpartition(".")[0]): r[6] for r in rows if r[4].endswith("weight")}
        for step, epoch, layer_id, layer, param, _stat, value in rows:
            key = (layer_id, param)
            history = self._norms.setdefault(key, deque(maxlen=c.explode_window))
            if not math.isfinite(value):
                continue
            if c.exploding and len(history) >= c.explode_min_history:
                median = statistics.median(history)  # of a short window: faster than np.median
                peak = max(self._peak_median.get(key, 0.0), median)
                self._peak_median[key] = peak
                # the floor: a converged model's gradients are orders of magnitude below those it
                # learned with, and one harder batch brings them back up by 10x without any danger
                limit = max(c.explode_factor * median, c.explode_floor * peak)
                if self._onset(R.EXPLODING, layer_id, param, median > 0 and value > limit):
                    message = (
                        f"exploding gradient at step {step}: [{layer_id}] {layer} ({param}) has L2 norm "
                        f"{value:.4g}, {value / median:.3g}x the median {median:.4g} of its last "
                        f"{len(history)} steps"
                    )
                    if c.explode_floor * peak > c.explode_factor * median:
                        message += f" and {value / peak:.3g}x its largest median {peak:.4g}"
                    new.append(Alert(R.EXPLODING, step, epoch, layer_id, layer, param, value, limit, message))
            history.append(value)
            if c.vanishing:
                limit = max(c.vanish_relative * largest, c.vanish_absolute)
                low = self._low_norm.get(key, 0) + 1 if value < limit else 0
                self._low_norm[key] = low
                if low == 0:
                    self._had_gradient.add(key)
                # a gradient that was never above the limit is zero by construction (a bias followed
                # by BatchNorm, an attention key bias): it did not vanish, it never existed
                vanished = low >= c.vanish_patience and key in self._had_gradient
                if param.endswith("bias"):
                    # a layer whose weight still learns has not vanished: a tiny bias gradient beside
                    # it is structural (the same BatchNorm and key-bias cases, with rounding noise)
                    weight = weight_norms.get((layer_id, param.rpartition(".")[0]))
                    vanished = vanished and not (weight is not None and weight >= limit)
                if self._onset(R.VANISHING, layer_id, param, vanished):
                    message = (
                        f"vanishing gradient at step {step}: [{layer_id}] {layer} ({param}) has L2 norm "
                        f"{value:.3g}, below {limit:.3g} ({c.vanish_relative:g} x the step's largest norm) "
                        f"for {low} steps"
                    )
                    new.append(Alert(R.VANISHING, step, epoch, layer_id, layer, param, value, limit, message))
        return new

    def _ratios(self, rows: list[Row]) -> list[Alert]:
        c, new = self.config, list[Alert]()
        if not c.update_ratio:
            return new
        weights = {(r[2], r[4].rpartition(".")[0]): r[6] for r in rows if r[4].endswith("weight")}
        for step, epoch, layer_id, layer, param, _stat, value in rows:
            if (
                not math.isfinite(value)
                or self._first_step is None
                or step - self._first_step < c.ratio_warmup
            ):
                continue
            key = (layer_id, param)
            low = self._low_ratio.get(key, 0) + 1 if value < c.ratio_low else 0
            self._low_ratio[key] = low
            high = value > c.ratio_high
            if high and param.endswith("bias"):
                # a bias near zero (zero-initialised, as in LayerNorm and most transformers) is as small
                # as one step, so its own ratio is large while its layer barely moves: the layer's
                # weight decides
                weight = weights.get((layer_id, param.rpartition(".")[0]))
                high = weight is None or not math.isfinite(weight) or weight > c.ratio_high
            if self._onset(R.RATIO_BAND, layer_id, param, high or low >= c.ratio_patience):
                side = f"above {c.ratio_high:g}" if high else f"below {c.ratio_low:g} for {low} steps"
                message = (
                    f"update ratio out of band at step {step}: [{layer_id}] {layer} ({param}) "
                    f"||dW||/||W|| = {value:.3g}, {side}"
                )
                limit = c.ratio_high if high else c.ratio_low
                new.append(Alert(R.RATIO_BAND, step, epoch, layer_id, layer, param, value, limit, message))
        return new

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
