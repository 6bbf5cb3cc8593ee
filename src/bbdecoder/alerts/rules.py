"""Alert rules: what counts as a training anomaly, with thresholds and the reason for each.

Every rule looks at one series' recent history (a parameter's gradient norm, a layer's dead-unit
fraction, the loss) and fires at the *onset* of an anomaly: it fires again for the same series
only after the series was healthy once more. Events are stored with these kinds:

``nonfinite_grad``
    a gradient statistic is NaN or Inf. A single NaN poisons every later update, so it is always an
    error. (The Analyzer reports it itself, naming the first layer in backward order; the engine
    reports it only when that is switched on, e.g. when replaying a store.)
``exploding_grad``
    a parameter's gradient L2 norm exceeds ``explode_factor`` times the median of its previous
    ``explode_window`` steps. The median of the layer's own history, not a global threshold: norms
    differ by orders of magnitude between layers, and a jump of 10x within a few steps is what a
    learning-rate spike or a bad batch looks like before the loss diverges. The norm must also exceed
    ``explode_floor`` times the largest such median the parameter ever had (the scale of its
    gradients while the model learned): a converged model's gradients shrink by orders of magnitude,
    and one harder batch then lifts them 10x above their recent median while they stay far below
    anything training survived, which is no danger (TensorBoard or W&B curves show a blip). The floor
    binds only once the median has fallen ``explode_factor / explode_floor`` times below its peak, so
    early in training the rule is the plain median rule.
``vanishing_grad``
    a parameter's gradient L2 norm stays below ``vanish_relative`` times the largest norm of that
    step (or below ``vanish_absolute``) for ``vanish_patience`` consecutive steps. Relative, because
    what matters is that a layer learns far slower than the rest; sustained, because one tiny
    gradient (a saturated batch) is harmless. Only a gradient that was once above that limit can
    vanish: one that is tiny from the first step is zero by construction (a conv bias followed by
    BatchNorm, a transformer's attention key bias, up to rounding) and is benign; for the same
    reason a bias whose layer's weight gradient is above the limit is not reported.
``dead_units_rising``
    a layer's dead-unit fraction rose by ``dead_rise`` or more above the lowest value it had. Units
    that die during training (ReLU units pushed negative for every input) never recover without
    intervention; a rise, rather than a level, is flagged because some architectures start with a
    few dead units by design.
``update_ratio_out_of_band``
    a parameter's update ratio ``||dW|| / ||W||`` left ``[ratio_low, ratio_high]``: above the band at
    once (one step that moves weights by a large fraction of their size undoes training), below it
    for ``ratio_patience`` consecutive steps (the layer has stopped learning). The first
    ``ratio_warmup`` steps are skipped: zero-initialised biases have ratios near 1 while they grow.
    Infinite ratios (weight exactly zero) are undefined and skipped. A bias above the band is reported
    only when the weight of its layer is above it too (or the layer has no weight): a bias that starts
    at zero (LayerNorm, transformer projections) or settles near zero has a norm of the order of one
    optimizer step (Adam moves every element by about the learning rate), so its own ratio stays near
    1 while the layer's output barely moves; a learning rate that is really too high moves the weight
    too.
``loss_spike``
    the loss exceeds the median of its previous ``loss_window`` values by more than ``loss_factor``
    robust standard deviations (1.4826 x the median absolute deviation, floored at
    ``loss_min_scale`` x |median| so a flat loss does not make every wiggle a spike, and at
    ``loss_floor`` x the largest |median| it had, so a converged loss of 0.002 that one harder batch
    lifts to 0.003 is not a spike either). Sign-agnostic, so negative log-likelihoods work too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bbdecoder.store import vocabulary as V

NONFINITE = V.NONFINITE_GRAD
EXPLODING = V.EXPLODING_GRAD
VANISHING = V.VANISHING_GRAD
DEAD_RISING = V.DEAD_UNITS_RISING
RATIO_BAND = V.UPDATE_RATIO_OUT_OF_BAND
LOSS_SPIKE = V.LOSS_SPIKE

ALERT_KINDS = V.ALERT_KINDS
"""Every event kind an alert is stored under."""

Row = tuple[int, int, int, str, str, str, float]
"""``(step, epoch, layer_id, layer, param, stat, value)``, the reader's column order."""


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


@dataclass
class AlertConfig:
    """Thresholds of the alert rules (see :mod:`bbdecoder.alerts.rules` for why each exists).

    Set a rule's switch (``exploding``, ``vanishing``, ...) to ``False`` to turn it off.
    """

    nonfinite: bool = False
    exploding: bool = True
    explode_factor: float = 10.0
    explode_window: int = 20
    explode_min_history: int = 5
    explode_floor: float = 1.0
    vanishing: bool = True
    vanish_relative: float = 1e-6
    vanish_absolute: float = 1e-12
    vanish_patience: int = 3
    dead_units: bool = True
    dead_rise: float = 0.3
    update_ratio: bool = True
    ratio_low: float = 1e-7
    ratio_high: float = 0.5
    ratio_patience: int = 5
    ratio_warmup: int = 20
    loss: bool = True
    loss_factor: float = 8.0
    loss_window: int = 20
    loss_min_history: int = 5
    loss_min_scale: float = 0.05
    loss_floor: float = 0.02

    def __post_init__(self) -> None:
        checks = {
            "explode_factor": self.explode_factor > 1,
            "explode_window": self.explode_window >= 1,
            "explode_min_history": 1 <= self.explode_min_history <= self.explode_window,
            "explode_floor": self.explode_floor >= 0,
            "vanish_relative": 0 <= self.vanish_relative < 1,
            "vanish_patience": self.vanish_patience >= 1,
            "dead_rise": 0 < self.dead_rise <= 1,
            "ratio_low": 0 <= self.ratio_low < self.ratio_high,
            "ratio_patience": self.ratio_patience >= 1,
            "loss_factor": self.loss_factor > 0,
            "loss_min_history": 1 <= self.loss_min_history <= self.loss_window,
            "loss_floor": self.loss_floor >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"AlertConfig: invalid {', '.join(bad)} (see the docstring of bbdecoder.alerts.rules)"
            )
