"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training").

``G`` is the true (expected) gradient and ``Sigma`` the covariance of one sample's gradient. A
batch gradient of ``B`` samples has ``E ||G_B||^2 = |G|^2 + tr(Sigma) / B``; the estimators here are
unbiased for ``tr(Sigma)`` and ``|G|^2`` separately (their ratio is not unbiased, which is why the
paper smooths numerator and denominator separately, :class:`NoiseScaleEMA`).

- From per-sample gradients ``g_i`` of one batch (:func:`from_samples`): with
  ``sample_var = (1/B) sum_i ||g_i - G_B||^2``, ``tr(Sigma) ~ B / (B - 1) * sample_var`` and
  ``|G|^2 ~ ||G_B||^2 - tr(Sigma)~ / B``.
- From two batch sizes (:func:`from_two_batches`, the paper's appendix A.1): with ``||G_small||^2``
  on ``B_small`` samples and ``||G_big||^2`` on ``B_big``,
  ``|G|^2 ~ (B_big ||G_big||^2 - B_small ||G_small||^2) / (B_big - B_small)`` and
  ``tr(Sigma) ~ (||G_small||^2 - ||G_big||^2) / (1 / B_small - 1 / B_big)``. The small batches are
  the micro-batches of an accumulated step or the ranks' local batches (``||G_small||^2`` their mean
  squared norm), the big one their union (:func:`from_parts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NoiseEstimate:
    """Unbiased ``trace`` (tr Sigma) and ``grad_sq`` (|G|^2) estimates of one step."""

    trace: float
    grad_sq: float

    @property
    def noise_scale(self) -> float:
        """``B_simple = trace / grad_sq`` (NaN when ``grad_sq`` is 0)."""
        return self.trace / self.grad_sq if self.grad_sq != 0 else math.nan


def from_samples(sample_var: float, grad_sq: float, batch_size: int) -> NoiseEstimate:
    """From per-sample gradients: ``sample_var = (1/B) sum_i ||g_i - G_B||^2`` and ``grad_sq =
    ||G_B||^2`` of one batch of ``batch_size >= 2`` samples."""
    if batch_size < 2:
        raise ValueError(f"the across-sample variance needs at least 2 samples, got batch_size={batch_size}")
    trace = batch_size / (batch_size - 1) * sample_var
    return NoiseEstimate(trace, grad_sq - trace / batch_size)


def from_two_batches(small_sq: float, b_small: float, big_sq: float, b_big: float) -> NoiseEstimate:
    """From ``||G_small||^2`` over ``b_small`` samples and ``||G_big||^2`` over ``b_big > b_small``."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(trace, grad_sq)


def from_parts(part_sq: Sequence[float], part_size: float, union_sq: float) -> NoiseEstimate:
    """``k >= 2`` equal parts (micro-batches, ranks) of ``part_size`` samples each with gradient
    squared norms ``part_sq``, and ``union_sq`` the squared norm of their mean gradient (the
    batch of ``k * part_size``)."""
    if len(part_sq) < 2:
        raise ValueError(f"the two-batch estimator needs at least 2 parts, got {len(part_sq)}")
    small = sum(part_sq) / len(part_sq)
    return from_two_batches(small, part_size, union_sq, part_size * len(part_sq))


class NoiseScaleEMA:
    """``B_simple`` smoothed over steps: exponential moving averages of ``tr(Sigma)`` and ``|G|^2``
    kept separately (as the paper recommends), bias-corrected like Adam's moments, and divided.

    Args:
        decay: weight of the past, in ``[0, 1)`` (0: no smoothing).
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._trace = 0.0
        self._grad_sq = 0.0
        self._weight = 0.0

    def update(self, estimate: NoiseEstimate) -> float:
        """Add one step (non-finite estimates are skipped); returns the smoothed ``B_simple``."""
        if math.isfinite(estimate.trace) and math.isfinite(estimate.grad_sq):
            d = self.decay
            self._trace = d * self._trace + (1 - d) * estimate.trace
            self._grad_sq = d * self._grad_sq + (1 - d) * estimate.grad_sq
            self._weight = d * self._weight + (1 - d)
        return self.value

    @property
    def estimate(self) -> NoiseEstimate:
        """The smoothed (bias-corrected) ``tr(Sigma)`` and ``|G|^2``."""
        if self._weight == 0:
            return NoiseEstimate(math.nan, math.nan)
        return NoiseEstimate(self._trace / self._weight, self._grad_sq / self._weight)

    @property
    def value(self) -> float:
        """The smoothed ``B_simple`` (NaN before the first finite step)."""
        return self.estimate.noise_scale


__all__ = ["NoiseEstimate", "NoiseScaleEMA", "from_parts", "from_samples", "from_two_batches"]
