"""Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017) for Keras models.

The same quadrature rules (:func:`bbdecoder.attribution.quadrature.quadrature`), baselines and
step-major batching as the PyTorch :class:`~bbdecoder.IntegratedGradients`, through ``tf.GradientTape``.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np
import torch

from bbdecoder.attribution.baselines import NAMED_BASELINES, make_baseline
from bbdecoder.attribution.quadrature import quadrature
from bbdecoder.keras._backend import tf
from bbdecoder.keras.base import KerasExplainer, KerasInputTransform, check_inputs
from bbdecoder.keras.layers import LayerCall, intercepted_calls, leaf_layers
from bbdecoder.keras.targets import (
    KerasTargetLike,
    TargetError,
    is_callable_target,
    resolve_classes,
    rows_of,
    select_scores,
)
from bbdecoder.validation import check_positive_int

DEFAULT_BUDGET_BYTES = 512 * 2**20
# A row with gradients holds its saved activations, then their gradients during backward, plus slack.
GRAD_MEMORY_FACTOR = 3


class IntegratedGradients(KerasExplainer):
    """Integrated Gradients along the straight path from a baseline to the input.

    Args:
        model: a Keras 3 model returning logits (N, classes), or anything with a callable target.
        input_transform: applied inside every forward pass (e.g. a normalisation); baselines and
            attributions stay in the untransformed (pixel) space, so ``"black"`` is black.
        memory_budget_bytes: bytes the step batches may use when ``internal_batch_size`` is not given
            (default 512 MiB), estimated with one probe forward of a single sample.
    """

    def __init__(
        self,
        model: Any,
        *,
        input_transform: KerasInputTransform | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        super().__init__(model, input_transform=input_transform)
        check_positive_int(memory_budget_bytes, "memory_budget_bytes", optional=True)
        self.memory_budget_bytes = memory_budget_bytes

    @overload  # type: ignore[override]
    def attribute(
        self,
        inputs: Any,
        target: KerasTargetLike = ...,
        baseline: Any = ...,
        n_steps: int = ...,
        method: str = ...,
        internal_batch_size: int | None = ...,
        return_convergence_delta: Literal[False] = ...,
    ) -> Any: ...

    @overload
    def attribute(
        self,
        inputs: Any,
        target: KerasTargetLike = ...,
        baseline: Any = ...,
        n_steps: int = ...,
        method: str = ...,
        internal_batch_size: int | None = ...,
        *,
        return_convergence_delta: Literal[True],
    ) -> tuple[Any, Any]: ...

    def attribute(
        self,
        inputs: Any,
        target: KerasTargetLike = None,
        baseline: Any = "black",
        n_steps: int = 50,
        method: str = "riemann_trapezoid",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
    ) -> Any:
        """Integrated Gradients of the target score.

        Args:
            inputs: (N, *spatial, C) channels last (or (N, features)).
            target: ``None`` (arg-max of the clean input), an int, one class per sample, or a callable
                ``f(output) -> (rows,)`` that scores each row of a batch of path points on its own.
            baseline: ``"black"``, ``"white"``, ``"uniform"`` (seeded noise over each sample's range),
                ``"blur"`` (Gaussian blur over the spatial axes), a number, a tensor or array
                broadcastable to the inputs, or a callable ``f(inputs) -> tensor``.
            n_steps: quadrature nodes along the path.
            method: ``riemann_left|right|middle|trapezoid`` or ``gausslegendre``.
            internal_batch_size: most rows (sample x step) per forward pass; default from the budget.
            return_convergence_delta: also return ``sum(attr) - (F(x) - F(x'))`` per sample.

        Returns:
            A tf.Tensor shaped like ``inputs``; with ``return_convergence_delta`` a tuple
            ``(attribution, delta (N,))``.
        """
        x = check_inputs(inputs)
        alphas, weights = quadrature(method, n_steps)
        base = keras_baseline(baseline, x)
        n = int(x.shape[0])
        rows = self._rows_per_pass(x, internal_batch_size)
        scores_x: Any = None
        frozen: KerasTargetLike
        if target is None:
            scores_x, frozen = self._clean_scores(x, None, rows)
        else:
            frozen = _per_sample_target(target, n)
        grads = self._integrated_gradient(x, base, frozen, alphas.numpy(), weights.tolist(), rows)
        attribution = (x - base) * grads
        if not return_convergence_delta:
            return attribution
        if scores_x is None:
            scores_x, _ = self._clean_scores(x, frozen, rows)
        scores_base, _ = self._clean_scores(base, frozen, rows)
        summed = tf.reduce_sum(tf.reshape(attribution, [n, -1]), axis=1)
        delta = summed - tf.cast(scores_x - scores_base, attribution.dtype)
        return attribution, delta

    # -- steps ------------------------------------------------------------------------------------
    def _integrated_gradient(
        self, x: Any, base: Any, target: KerasTargetLike, alphas: np.ndarray, weights: list[float], rows: int
    ) -> Any:
        """``sum_s w_s dF/dx(x' + a_s (x - x'))`` shaped like ``x``; rows are step-major."""
        n = int(x.shape[0])
        total_rows = n * len(alphas)
        diff = x - base
        broadcast = [-1] + [1] * (x.shape.rank - 1)
        accumulated = np.zeros(x.shape, dtype=x.dtype.as_numpy_dtype)
        for start in range(0, total_rows, rows):
            stop = min(start + rows, total_rows)
            row = np.arange(start, stop)
            sample, step = row % n, row // n
            path_alphas = tf.reshape(tf.constant(alphas[step], dtype=x.dtype), broadcast)
            path = tf.gather(base, sample) + path_alphas * tf.gather(diff, sample)
            with tf.GradientTape() as tape:
                tape.watch(path)
                scores = select_scores(self.forward(path), rows_of(target, sample), stop - start)
                total = tf.reduce_sum(scores)
            grad = tape.gradient(total, path, unconnected_gradients=tf.UnconnectedGradients.ZERO).numpy()
            for s in range(start // n, (stop - 1) // n + 1):
                lo, hi = max(start, s * n), min(stop, (s + 1) * n)
                accumulated[lo - s * n : hi - s * n] += weights[s] * grad[lo - start : hi - start]
        return tf.constant(accumulated)

    def _clean_scores(self, x: Any, target: KerasTargetLike, rows: int) -> tuple[Any, KerasTargetLike]:
        """Scores (N,) of ``x`` without gradients, and the target frozen to classes (callables kept)."""
        n = int(x.shape[0])
        scores: list[Any] = []
        classes: list[Any] = []
        is_callable = is_callable_target(target)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            output = self.forward(x[start:stop])
            if is_callable:
                scores.append(select_scores(output, target, stop - start))
                continue
            chunk_classes = resolve_classes(output, rows_of(target, np.arange(start, stop)), stop - start)
            classes.append(chunk_classes)
            scores.append(tf.gather(output, chunk_classes, axis=1, batch_dims=1))
        frozen: KerasTargetLike = target if is_callable else tf.concat(classes, axis=0)
        return tf.stop_gradient(tf.concat(scores, axis=0)), frozen

    def _rows_per_pass(self, x: Any, internal_batch_size: int | None) -> int:
        if internal_batch_size is not None:
            check_positive_int(internal_batch_size, "internal_batch_size")
            return internal_batch_size
        return rows_for_budget(self, x, self.memory_budget_bytes or DEFAULT_BUDGET_BYTES)


def activation_bytes_per_row(explainer: KerasExplainer, inputs: Any) -> int:
    """Bytes of one sample's input and of every leaf layer's outputs (one probe forward)."""
    one = inputs[:1]
    total = [one.shape.num_elements() * one.dtype.size]

    def count(_layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        output = call(*args, **kwargs)
        tensors = [t for t in tf.nest.flatten(output) if isinstance(t, tf.Tensor)]
        total[0] += sum(t.shape.num_elements() * t.dtype.size for t in tensors)
        return output

    with intercepted_calls(leaf_layers(explainer.model), count):
        explainer.forward(one)
    return total[0]


def rows_for_budget(explainer: KerasExplainer, inputs: Any, budget_bytes: int) -> int:
    """Rows per forward+backward pass that fit ``budget_bytes`` (at least 1)."""
    per_row = activation_bytes_per_row(explainer, inputs) * GRAD_MEMORY_FACTOR
    return max(1, budget_bytes // max(1, per_row))


def keras_baseline(spec: Any, inputs: Any, seed: int = 0, *, blur_sigma: float | None = None) -> Any:
    """The baseline for channels-last ``inputs``, a tf.Tensor with their shape and dtype.

    Named baselines are made by :func:`bbdecoder.attribution.make_baseline` on the channels-first view,
    so ``"uniform"`` and ``"blur"`` give exactly the PyTorch side's baselines, transposed.
    """
    x = tf.convert_to_tensor(inputs)
    if isinstance(spec, str):
        if spec not in NAMED_BASELINES:
            raise ValueError(
                f"unknown baseline {spec!r}; use one of {', '.join(NAMED_BASELINES)}, a number, a tensor "
                "broadcastable to the inputs, or a callable f(inputs) -> tensor"
            )
        channels_first = torch.from_numpy(_to_channels_first(x.numpy()))
        made = make_baseline(spec, channels_first, seed, blur_sigma=blur_sigma).numpy()
        return tf.constant(_to_channels_last(made), dtype=x.dtype)
    if isinstance(spec, bool):
        raise TypeError("a baseline cannot be a bool; use 0.0 or 1.0")
    if isinstance(spec, (int, float)):
        return tf.fill(tf.shape(x), tf.constant(float(spec), dtype=x.dtype))
    if isinstance(spec, (tf.Tensor, np.ndarray)):
        return _broadcast(spec, x, "tensor")
    if callable(spec):
        made = spec(x)
        if not isinstance(made, (tf.Tensor, np.ndarray)):
            raise TypeError(f"a baseline callable must return a tensor, got {type(made).__name__}")
        return _broadcast(made, x, "callable's result")
    raise TypeError(f"a baseline must be a name, a number, a tensor or a callable, got {type(spec).__name__}")


def _to_channels_first(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, -1, 1)) if array.ndim >= 3 else array


def _to_channels_last(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, 1, -1)) if array.ndim >= 3 else array


def _broadcast(baseline: Any, x: Any, what: str) -> Any:
    value = tf.cast(tf.convert_to_tensor(baseline), x.dtype)
    try:
        return tf.identity(tf.broadcast_to(value, tf.shape(x)))
    except (tf.errors.InvalidArgumentError, ValueError):
        raise ValueError(
            f"the baseline {what} has shape {tuple(value.shape)}, which does not broadcast to the "
            f"inputs' shape {tuple(x.shape)}; give one baseline per sample (N, ...) or one for all (1, ...)"
        ) from None


def _per_sample_target(target: KerasTargetLike, n: int) -> KerasTargetLike:
    """Check a class-sequence target's length up front (chunks only ever see slices of it)."""
    if target is None or isinstance(target, (int, np.integer)) or is_callable_target(target):
        return target
    classes = np.asarray(target.numpy() if isinstance(target, tf.Tensor) else target)
    if classes.ndim == 0:
        return classes
    if classes.ndim != 1 or classes.shape[0] != n:
        raise TargetError(
            f"got {classes.size} targets of shape {classes.shape} for a batch of {n}; "
            "give one class per sample, a single int, or None for the arg-max"
        )
    return tf.constant(classes)


__all__ = ["IntegratedGradients", "activation_bytes_per_row", "keras_baseline", "rows_for_budget"]
