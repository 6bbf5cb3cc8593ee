"""The per-tensor alert rules over one step's values at once: exploding and vanishing gradient
norms, the update-ratio band (:mod:`bbdecoder.alerts.rules` says what each means and why).

Their state lives in arrays indexed by tensor (:class:`TensorState`) and a step's values come as
one array (:class:`StepValues`), so a step of N tensors costs a few NumPy operations, not N rounds
of Python: the live rules run every recorded step on the store's writer thread (on CUDA, on the
training thread), where a loop over the rows held the GIL about 4 us per tensor and step. A row
is built only for an alert. The alerts, their onsets, order and messages are those of a loop over
the rows in order (tested against one). Where the C extension is built, a step's finite table
takes one call instead (:mod:`bbdecoder.alerts.table_kernel`, the same arithmetic on the same
arrays); this module remains the reference, and judges every table the kernel declines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from bbdecoder.alerts import rules as R
from bbdecoder.alerts.rules import Alert, AlertConfig, Row

WeightValues = dict[tuple[int, str], float]
"""``{(layer_id, module path): value}`` of a step's weight tensors (the bias rules consult them)."""


class TensorState:
    """What the rules remember of each tensor ``(layer_id, param)``, grown as tensors appear: the
    last ``window`` finite gradient norms (NaN marks an empty slot), the largest median, the run
    lengths of low norms and of low ratios, whether the gradient was ever above the vanishing
    limit, and which anomalies are ongoing (an alert fires at an onset only)."""

    _PER_TENSOR = (
        "filled", "next_slot", "peak_median", "low_norm", "had_gradient", "low_ratio",
        "exploding", "vanishing", "ratio_band",
    )  # fmt: skip

    def __init__(self, window: int) -> None:
        self.keys: dict[tuple[int, str], int] = {}
        self.window = np.full((0, window), np.nan)
        self.filled = np.zeros(0, np.int64)
        self.next_slot = np.zeros(0, np.int64)
        self.peak_median = np.zeros(0)
        self.low_norm = np.zeros(0, np.int64)
        self.had_gradient = np.zeros(0, bool)
        self.low_ratio = np.zeros(0, np.int64)
        self.exploding = np.zeros(0, bool)
        self.vanishing = np.zeros(0, bool)
        self.ratio_band = np.zeros(0, bool)

    def position(self, key: tuple[int, str]) -> int:
        """The state index of tensor ``key`` (a new tensor gets fresh state)."""
        at = self.keys.get(key)
        if at is None:
            at = self.keys[key] = len(self.keys)
            self._grow(len(self.keys))
        return at

    def _grow(self, n: int) -> None:
        extra = n - len(self.filled)
        if extra <= 0:
            return
        extra = max(extra, len(self.filled))  # doubling: the row path adds tensors one at a time
        self.window = np.vstack([self.window, np.full((extra, self.window.shape[1]), np.nan)])
        for name in self._PER_TENSOR:
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.zeros(extra, old.dtype)]))

    def medians(self, index: np.ndarray, filled: np.ndarray | None = None) -> np.ndarray:
        """The median of each tensor's remembered norms, as ``statistics.median`` computes it (the
        middle value, or the mean of the two middle ones); each of ``index`` has at least one
        (``filled``: their counts, where the caller has them)."""
        ordered = np.sort(self.window[index], axis=1)  # the empty slots (NaN) sort last
        n = self.filled[index] if filled is None else filled
        width = ordered.shape[1]
        if n.min() == width:  # every window full (the steady state): one middle for all
            half = width // 2
            return ordered[:, half] if width % 2 else (ordered[:, half - 1] + ordered[:, half]) / 2
        rows = np.arange(len(index))
        upper = ordered[rows, n // 2]
        lower = ordered[rows, np.maximum(n // 2 - 1, 0)]
        return np.where(n % 2 == 1, upper, (lower + upper) / 2)

    def remember(self, index: np.ndarray, values: np.ndarray) -> None:
        """Append one finite norm to each tensor's window (``index`` without repeats)."""
        width = self.window.shape[1]
        slot = self.next_slot[index]
        self.window[index, slot] = values
        slot += 1
        slot[slot == width] = 0
        self.next_slot[index] = slot
        filled = self.filled[index]
        self.filled[index] = np.minimum(filled + 1, width, out=filled)


@dataclass
class StepValues:
    """One statistic of one step for some tensors: ``values[i]`` of the tensor at state index
    ``index[i]``; ``row(i)`` its row (built for an alert only); ``weights()`` the values of the
    weights among them, by layer and module path."""

    index: np.ndarray
    values: np.ndarray
    row: Callable[[int], Row]
    weights: Callable[[], WeightValues]
    distinct: bool = False  # known to hold no tensor twice (else :func:`_distinct_runs` looks)
    finite: bool = False  # known to be all finite (else the rules look)

    @classmethod
    def from_rows(cls, state: TensorState, rows: list[Row]) -> StepValues:
        return cls(
            np.array([state.position((r[2], r[4])) for r in rows], dtype=np.int64),
            np.array([r[6] for r in rows], dtype=np.float64),
            rows.__getitem__,
            lambda: weights_by_layer((r[2], r[4], r[6]) for r in rows),
        )


def weights_by_layer(items: Iterable[tuple[int, str, float]]) -> WeightValues:
    """``{(layer_id, module path): value}`` of the ``(layer_id, param, value)`` items whose param
    is a weight (the last one wins)."""
    return {(lid, param.rpartition(".")[0]): value for lid, param, value in items if param.endswith("weight")}


def grad_norm_alerts(state: TensorState, config: AlertConfig, step: StepValues) -> list[Alert]:
    """The exploding and vanishing alerts of one step's gradient norms (in row order, a row's
    exploding alert before its vanishing one)."""
    if not len(step.index):
        return []
    if step.finite:
        largest = float(step.values.max())
    else:
        finite = np.isfinite(step.values)
        n_finite = int(np.count_nonzero(finite))
        largest = float(step.values[finite].max()) if n_finite else 0.0
    weights = _Lazy(step.weights)
    new: list[tuple[int, int, Alert]] = []
    for part in _distinct_runs(step.index, step.distinct):
        new += _grad_norm_part(state, config, step, part, largest, weights)
    return [alert for *_, alert in sorted(new, key=lambda t: (t[0], t[1]))]


def _grad_norm_part(
    state: TensorState, c: AlertConfig, step: StepValues, part: slice, largest: float, weights: _Lazy
) -> list[tuple[int, int, Alert]]:
    index, values = step.index[part], step.values[part]
    # a non-finite norm is neither judged nor remembered
    kept = None if step.finite else _subset(np.isfinite(values))
    index, values = _take(index, kept), _take(values, kept)
    new: list[tuple[int, int, Alert]] = []
    if c.exploding and len(index):
        counts = state.filled[index]
        fewest = int(counts.min())
        judged = None if fewest >= c.explode_min_history else _subset(counts >= c.explode_min_history)
        at = _take(index, judged)
        if len(at):
            median = state.medians(at, _take(counts, judged))
            peak = np.maximum(state.peak_median[at], median)
            state.peak_median[at] = peak
            # the floor: a converged model's gradients are orders of magnitude below those it
            # learned with, and one harder batch brings them back up by 10x without any danger
            limit = np.maximum(c.explode_factor * median, c.explode_floor * peak)
            bad = (median > 0) & (_take(values, judged) > limit)
            onset = bad > state.exploding[at]  # bad now, not before
            state.exploding[at] = bad
            for j in _where(onset):
                k = _position(judged, j)
                i = part.start + _position(kept, k)
                fired = exploding_alert(
                    step.row(i), float(median[j]), float(peak[j]), float(limit[j]), int(counts[k]), c
                )
                new.append((i, 0, fired))
    state.remember(index, values)
    if c.vanishing:
        limit_v = max(c.vanish_relative * largest, c.vanish_absolute)
        low = np.where(values < limit_v, state.low_norm[index] + 1, 0)
        state.low_norm[index] = low
        state.had_gradient[index] |= low == 0
        # a gradient that was never above the limit is zero by construction (a bias followed by
        # BatchNorm, an attention key bias): it did not vanish, it never existed
        vanished = (low >= c.vanish_patience) & state.had_gradient[index]
        for j in _where(vanished):
            # a layer whose weight still learns has not vanished: a tiny bias gradient beside it is
            # structural (a bias before BatchNorm, an attention key bias, with rounding noise)
            weight = _partner_weight(step.row(part.start + _position(kept, j)), weights)
            vanished[j] = not (weight is not None and weight >= limit_v)
        onset = vanished > state.vanishing[index]
        state.vanishing[index] = vanished
        for j in _where(onset):
            i = part.start + _position(kept, j)
            new.append((i, 1, _vanishing(step.row(i), limit_v, int(low[j]), c)))
    return new


def ratio_alerts(
    state: TensorState, config: AlertConfig, step: StepValues, step_number: int, first_step: int
) -> list[Alert]:
    """The update-ratio band alerts of one step's ratios (none in the first ``ratio_warmup`` steps
    from ``first_step``), in row order."""
    c = config
    if not c.update_ratio or not len(step.index) or step_number - first_step < c.ratio_warmup:
        return []
    weights = _Lazy(step.weights)
    new: list[Alert] = []
    for part in _distinct_runs(step.index, step.distinct):
        values = step.values[part]
        judged = None if step.finite else _subset(np.isfinite(values))  # an infinite ratio: undefined
        at, v = _take(step.index[part], judged), _take(values, judged)
        low = np.where(v < c.ratio_low, state.low_ratio[at] + 1, 0)
        state.low_ratio[at] = low
        high = v > c.ratio_high
        for j in _where(high):
            # a bias near zero moves by about one optimizer step, so its own ratio stays near 1
            # while its layer barely moves: the layer's weight decides
            weight = _partner_weight(step.row(part.start + _position(judged, j)), weights)
            high[j] = weight is None or not math.isfinite(weight) or weight > c.ratio_high
        bad = high | (low >= c.ratio_patience)
        onset = bad > state.ratio_band[at]
        state.ratio_band[at] = bad
        for j in _where(onset):
            row = step.row(part.start + _position(judged, j))
            new.append(ratio_alert(row, bool(high[j]), int(low[j]), c))
    return new


def _subset(mask: np.ndarray) -> np.ndarray | None:
    """The positions where the 1-D ``mask`` holds, or ``None`` when it holds everywhere (the usual
    step: the arrays are then used as they are, without a copy)."""
    return None if np.count_nonzero(mask) == len(mask) else mask.nonzero()[0]


def _where(mask: np.ndarray) -> np.ndarray:
    """The positions where the 1-D ``mask`` holds (usually none: one call, no reduction first)."""
    return mask.nonzero()[0]


def _take(array: np.ndarray, subset: np.ndarray | None) -> np.ndarray:
    return array if subset is None else array[subset]


def _position(subset: np.ndarray | None, j: int | np.integer) -> int:
    """The position in the full arrays of the ``j``-th element of ``subset``."""
    return int(j) if subset is None else int(subset[j])


class _Lazy:
    """The step's weight values, built on the first bias that needs them (rare: an alert's edge)."""

    def __init__(self, build: Callable[[], WeightValues]) -> None:
        self._build = build
        self._value: WeightValues | None = None

    def get(self, key: tuple[int, str]) -> float | None:
        if self._value is None:
            self._value = self._build()
        return self._value.get(key)


def _distinct_runs(index: np.ndarray, distinct: bool = False) -> Iterator[slice]:
    """Consecutive runs of rows without a tensor twice (one run for a normal step, and where
    ``distinct`` says so), so that a tensor repeated within one step sees its earlier row's state,
    as in a loop over the rows."""
    if distinct or len(set(index.tolist())) == len(index):
        yield slice(0, len(index))
        return
    start, seen = 0, set[int]()
    for i, k in enumerate(index.tolist()):
        if k in seen:
            yield slice(start, i)
            start, seen = i, set()
        seen.add(k)
    yield slice(start, len(index))


def _partner_weight(row: Row, weights: _Lazy) -> float | None:
    """The value of the weight beside a bias (``None``: not a bias, or its layer has no weight)."""
    if not row[4].endswith("bias"):
        return None
    return weights.get((row[2], row[4].rpartition(".")[0]))


def exploding_alert(
    row: Row, median: float, peak: float, limit: float, history: int, c: AlertConfig
) -> Alert:
    step, epoch, layer_id, layer, param, _stat, value = row
    message = (
        f"exploding gradient at step {step}: [{layer_id}] {layer} ({param}) has L2 norm "
        f"{value:.4g}, {value / median:.3g}x the median {median:.4g} of its last {history} steps"
    )
    if c.explode_floor * peak > c.explode_factor * median:
        message += f" and {value / peak:.3g}x its largest median {peak:.4g}"
    return Alert(R.EXPLODING, step, epoch, layer_id, layer, param, value, limit, message)


def _vanishing(row: Row, limit: float, low: int, c: AlertConfig) -> Alert:
    step, epoch, layer_id, layer, param, _stat, value = row
    message = (
        f"vanishing gradient at step {step}: [{layer_id}] {layer} ({param}) has L2 norm "
        f"{value:.3g}, below {limit:.3g} ({c.vanish_relative:g} x the step's largest norm) for {low} steps"
    )
    return Alert(R.VANISHING, step, epoch, layer_id, layer, param, value, limit, message)


def ratio_alert(row: Row, high: bool, low: int, c: AlertConfig) -> Alert:
    step, epoch, layer_id, layer, param, _stat, value = row
    side = f"above {c.ratio_high:g}" if high else f"below {c.ratio_low:g} for {low} steps"
    message = (
        f"update ratio out of band at step {step}: [{layer_id}] {layer} ({param}) "
        f"||dW||/||W|| = {value:.3g}, {side}"
    )
    limit = c.ratio_high if high else c.ratio_low
    return Alert(R.RATIO_BAND, step, epoch, layer_id, layer, param, value, limit, message)
