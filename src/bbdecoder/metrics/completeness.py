"""Completeness: does the attribution add up to the model's score?

* FullGrad: ``sum(x * dF/dx) + sum of bias gradients == F(x)`` (exact for piecewise-linear nets).
* Integrated Gradients and any other input-space explainer: ``sum(attribution) == F(x) - F(x')``
  with ``x'`` the baseline (IG's axiom; approximate, converging with ``n_steps``).

The expected side is always computed here, by separate forward passes, never taken from the explainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bbdecoder.attribution.base import check_inputs
from bbdecoder.attribution.outputs import model_output
from bbdecoder.metrics.summary import summarise
from bbdecoder.targets import TargetLike, select_scores


@dataclass
class CompletenessResult:
    """Per-sample completeness of one explainer on one batch.

    Attributes:
        relative_error: (N,) ``|total - expected| / max(|total|, |expected|)``.
        absolute_error: (N,) ``|total - expected|``.
        total: (N,) the sum of the attribution (FullGrad: input part plus all bias gradients).
        expected: (N,) ``F(x)`` (FullGrad) or ``F(x) - F(baseline)`` (path methods).
        method: ``"fullgrad"`` or ``"baseline"``.
        convergence_delta: (N,) IG's own delta when the explainer reports one, else ``None``.
    """

    relative_error: torch.Tensor
    absolute_error: torch.Tensor
    total: torch.Tensor
    expected: torch.Tensor
    method: str
    convergence_delta: torch.Tensor | None = None

    @property
    def per_sample(self) -> torch.Tensor:
        return self.relative_error

    def summary(self) -> dict[str, float]:
        """Statistics of the per-sample relative error (``n, n_nan, mean, std, median, min, max``)."""
        return summarise(self.relative_error)


def _relative(total: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    scale = torch.maximum(total.abs(), expected.abs()).clamp_min(torch.finfo(total.dtype).tiny)
    return (total - expected).abs() / scale


def _fullgrad_completeness(explainer: Any, inputs: torch.Tensor, target: TargetLike) -> CompletenessResult:
    decomposition = explainer.decompose(inputs, target)
    x = decomposition.inputs
    total = (x * decomposition.input_gradient).flatten(1).sum(1)
    for bias_gradient in decomposition.bias_gradients:
        total = total + bias_gradient.flatten(1).sum(1)
    frozen = explainer.freeze_target(inputs, target)
    with explainer.session(), torch.no_grad():
        # The decomposition lives in the model's input space, so F is evaluated on that input directly.
        output = model_output(explainer.model, x, getattr(explainer, "scores_from", "logits"))
        expected = select_scores(output, frozen, x.shape[0])
    return CompletenessResult(
        _relative(total, expected), (total - expected).abs(), total, expected, "fullgrad"
    )


def _baseline_completeness(
    explainer: Any, inputs: torch.Tensor, target: TargetLike, baseline: Any, attribute_kwargs: dict[str, Any]
) -> CompletenessResult:
    from bbdecoder.attribution.baselines import make_baseline

    frozen = explainer.freeze_target(inputs, target)
    reference = make_baseline(baseline, inputs)
    delta = None
    if _accepts_convergence_delta(explainer):
        out = explainer.attribute(
            inputs, frozen, baseline=reference, return_convergence_delta=True, **attribute_kwargs
        )
        attribution, delta = out
        delta = delta.detach()
    else:
        attribution = explainer.attribute(inputs, frozen, **attribute_kwargs)
    total = attribution.detach().flatten(1).sum(1)
    with explainer.session(), torch.no_grad():
        expected = explainer.scores(inputs, frozen)[0] - explainer.scores(reference, frozen)[0]
    total = total.to(expected.dtype)
    return CompletenessResult(
        _relative(total, expected), (total - expected).abs(), total, expected, "baseline", delta
    )


def _accepts_convergence_delta(explainer: Any) -> bool:
    import inspect

    try:
        parameters = inspect.signature(explainer.attribute).parameters
    except (TypeError, ValueError):
        return False
    return "return_convergence_delta" in parameters


def completeness(
    explainer: Any,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    baseline: Any = "black",
    **attribute_kwargs: Any,
) -> CompletenessResult:
    """Per-sample completeness error of ``explainer`` on ``inputs``.

    Args:
        explainer: ``FullGrad`` (checked through its decomposition) or any input-space explainer
            (``IntegratedGradients``, ``InputXGradient``, ...): ``sum(attr) == F(x) - F(baseline)``.
        inputs: (N, C, *spatial).
        target: as everywhere (``None`` = the arg-max class of the clean inputs, frozen for the baseline).
        baseline: for path methods: ``"black"``, ``"white"``, ``"blur"``, a number or a tensor; it is
            passed to the explainer as a tensor so both sides use the very same reference.
        attribute_kwargs: passed to ``explainer.attribute`` (e.g. ``n_steps=200``).

    Returns:
        :class:`CompletenessResult` with (N,) tensors and ``summary()``.
    """
    check_inputs(inputs)
    if hasattr(explainer, "decompose"):
        return _fullgrad_completeness(explainer, inputs, target)
    if not hasattr(explainer, "attribute"):
        raise TypeError(f"{type(explainer).__name__} has no attribute() method; completeness needs one")
    return _baseline_completeness(explainer, inputs, target, baseline, attribute_kwargs)
