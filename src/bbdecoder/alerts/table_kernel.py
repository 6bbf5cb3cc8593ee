"""The per-tensor rules of one finite step table in one C call.

:mod:`bbdecoder.alerts.tensor_rules` judges a step's values with some forty NumPy operations on
arrays of a few elements. On the store's writer thread each costs microseconds from the cold
caches a training step leaves, about 0.1 ms per table and two tables per step. Where the optional
extension ``bbdecoder.monitor._fused`` is built, ``norm_rules`` and ``ratio_rules`` do the same
arithmetic on the same :class:`~bbdecoder.alerts.tensor_rules.TensorState` arrays in one call
each. Python then builds the alerts of the onsets.

The kernels decline a table (``None``, nothing changed) where a rule needs a row's layer:
a vanishing candidate or a ratio above the band may be a bias whose verdict depends on its
layer's weight. The NumPy path then judges that table, as it does everywhere without the
extension (or with ``BBDECODER_FUSED=0``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import numpy as np

from bbdecoder.alerts.rules import Alert, AlertConfig, Row
from bbdecoder.alerts.table_plans import GRAD_NORM
from bbdecoder.alerts.tensor_rules import TensorState, exploding_alert, ratio_alert

__all__ = ["KERNEL", "table_alerts"]


def _load() -> ModuleType | None:
    if os.environ.get("BBDECODER_FUSED", "1") == "0":  # the monitor's switch for its C kernels
        return None
    try:
        from bbdecoder.monitor import _fused
    except ImportError:  # built without a compiler: the NumPy path
        return None
    return _fused if hasattr(_fused, "norm_rules") else None


KERNEL = _load()


def table_alerts(
    state: TensorState,
    config: AlertConfig,
    stat: str,
    values: np.ndarray,
    column: int,
    index: np.ndarray,
    step: int,
    first_step: int,
    row: Callable[[int], Row],
) -> list[Alert] | None:
    """The alerts of statistic ``stat`` (the gradient L2 norm or the update ratio) in column
    ``column`` of a finite table ``values`` ``(rows, statistics)`` whose rows hold distinct tensors
    (``index[i]``: the state index of row ``i``), in row order; ``row(i)`` builds row ``i`` for an
    alert. ``None`` where the NumPy path must judge this statistic (no kernel, a table that is not
    float64, or a rule that needs a row's layer); ``state`` is then as it was."""
    if KERNEL is None:
        return None
    c = config
    if stat == GRAD_NORM:
        rules = (
            c.exploding, c.explode_factor, c.explode_floor, c.explode_min_history,
            c.vanishing, c.vanish_relative, c.vanish_absolute, c.vanish_patience,
        )  # fmt: skip
        s = state
        found = KERNEL.norm_rules(
            values, column, index, s.window, s.filled, s.next_slot, s.peak_median, s.low_norm,
            s.had_gradient, s.exploding, s.vanishing, rules,
        )  # fmt: skip
        if found is None:
            return None
        return [
            exploding_alert(row(i), median, peak, limit, history, c)
            for i, median, peak, limit, history in found
        ]
    if not c.update_ratio or step - first_step < c.ratio_warmup:
        return []
    found = KERNEL.ratio_rules(
        values,
        column,
        index,
        state.low_ratio,
        state.ratio_band,
        (c.ratio_low, c.ratio_high, c.ratio_patience),
    )
    if found is None:
        return None
    return [ratio_alert(row(i), False, low, c) for i, low in found]
