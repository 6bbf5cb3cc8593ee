"""Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017), with memory-bounded step batching.

``IG_i(x) = (x_i - x'_i) * integral_0^1 dF/dx_i (x' + a (x - x')) da``, the integral taken by a
quadrature rule (:mod:`bbdecoder.attribution.quadrature`) whose weights sum to one, so an affine model
gets ``(x - x') * w`` exactly from every rule and ``sum(IG) = F(x) - F(x')`` (completeness) holds up to
the quadrature error, reported as the convergence delta.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer, InputTransform
from bbdecoder.attribution.baselines import BaselineSpec, make_baseline
from bbdecoder.attribution.layer_attribution import LayerSpec, layer_integrated_gradients, uses_layer
from bbdecoder.attribution.path_chunks import add_weighted, path_chunks
from bbdecoder.attribution.quadrature import check_quadrature
from bbdecoder.backends.base import is_callable_target
from bbdecoder.targets import TargetError, TargetLike, target_rows
from bbdecoder.validation import check_positive_int


class IntegratedGradients(Explainer):
    """Integrated Gradients along the straight path from a baseline to the input.

    Args:
        model: an ``nn.Module`` returning logits ``(N, classes)``, or anything with a callable target.
        input_transform: applied inside every forward pass, e.g. :class:`~bbdecoder.attribution.Normalize`.
            Baselines and attributions stay in pixel space, so with a model trained on normalised
            images pass the raw images plus ``input_transform=Normalize(mean, std)``: ``"black"`` is
            then black, whereas a zero after normalisation would be the dataset mean.
        eval_mode: run the model in eval mode and restore every module's mode afterwards.
        scores_from: ``"logits"`` (default: the logits beneath a final softmax/sigmoid module) or
            ``"output"``; see :class:`~bbdecoder.attribution.Explainer`.
        memory_budget_bytes: bytes the step batches may use when ``internal_batch_size`` is not given;
            default 1 GiB on CPU and half the free memory on CUDA. On CPU a pass is also kept near
            512 MiB of activations, where passes are fastest per row (see ``memory.rows_for_budget``).
        layer: attribute at this layer's output (Captum's ``LayerIntegratedGradients``); token ids and
            dict inputs default to ``get_input_embeddings()``. See
            :mod:`bbdecoder.attribution.layer_attribution`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        memory_budget_bytes: int | None = None,
        scores_from: str = "logits",
        layer: LayerSpec = None,
    ) -> None:
        super().__init__(
            model, input_transform=input_transform, eval_mode=eval_mode, scores_from=scores_from, layer=layer
        )
        check_positive_int(memory_budget_bytes, "memory_budget_bytes", optional=True)
        self.memory_budget_bytes = memory_budget_bytes
        self._rows_cache: dict[tuple[Any, ...], int] = {}

    @overload
    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = ...,
        baseline: BaselineSpec = ...,
        n_steps: int = ...,
        method: str = ...,
        internal_batch_size: int | None = ...,
        return_convergence_delta: Literal[False] = ...,
        **token_options: Any,
    ) -> torch.Tensor: ...

    @overload
    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = ...,
        baseline: BaselineSpec = ...,
        n_steps: int = ...,
        method: str = ...,
        internal_batch_size: int | None = ...,
        *,
        return_convergence_delta: Literal[True],
        **token_options: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        baseline: BaselineSpec = "black",
        n_steps: int = 50,
        method: str = "riemann_trapezoid",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        **token_options: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Integrated Gradients of the target score.

        Args:
            inputs: ``(N, C, *spatial)`` (or ``(N, features)``) in pixel space.
            target: ``None`` (arg-max of the clean input), an int, one class per sample, or a callable
                ``f(output) -> (rows,)``. A callable sees batches of path points (rows = sample x step,
                step-major) and must score each row on its own, e.g. ``lambda out: out[:, 3]``.
            baseline: see :func:`~bbdecoder.attribution.baselines.make_baseline` (``"black"``, ``"white"``,
                ``"uniform"``, ``"blur"``, a number, a tensor or a callable).
            n_steps: quadrature nodes along the path (at most 1,000,000; 1024 for ``gausslegendre``).
                Nodes are made per pass, so memory does not grow with ``n_steps``.
            method: ``riemann_left|right|middle|trapezoid`` or ``gausslegendre``.
            internal_batch_size: most rows (sample x step) per forward pass; default from the memory
                budget, estimated with one no-grad probe forward of a single sample.
            return_convergence_delta: also return ``sum(attr) - (F(x) - F(x'))`` per sample.
            token_options: for token inputs / ``layer=`` only: ``pad_token_id``, ``mask_token_id``
                (for ``baseline="pad"``/``"mask"``) and ``position`` (the next-token logit a class
                target reads in ``(N, L, V)`` logits, default -1: the last attended token). With token
                ids or a dict as ``inputs`` (or ``layer=``), IG runs at the layer's output and
                ``baseline`` may be ``"pad"``, ``"mask"``, ``"zero"`` or a tensor of ids; see
                :mod:`bbdecoder.attribution.layer_attribution`.

        Returns:
            The attribution shaped like ``inputs``; with ``return_convergence_delta`` a tuple
            ``(attribution, delta (N,))``.

        Chunking does not change the order in which the weighted gradients are summed (each element
        accumulates its steps in step order), so chunked and unchunked results are bitwise identical
        whenever the model computes each row's gradient independently of the batch size. BLAS matrix
        products (``nn.Linear``) may not: their blocking depends on the batch size, which moves a
        row's gradient by an ulp or so (about 1e-16 relative in float64).
        """
        if uses_layer(self, inputs):
            return layer_integrated_gradients(
                self,
                inputs,
                target,
                baseline,
                n_steps,
                method,
                internal_batch_size,
                return_convergence_delta,
                self.memory_budget_bytes,
                **token_options,
            )
        if token_options:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(token_options))}")
        backend = self.backend
        x = backend.prepare(inputs)
        n_steps = check_quadrature(method, n_steps)
        base = self.make_baseline(baseline, x)
        n = x.shape[0]
        target = backend.user_target(target)
        with backend.session():
            rows = self._rows_per_pass(x, internal_batch_size)
            frozen: TargetLike
            scores_x: torch.Tensor | None = None
            if target is None:
                scores_x, frozen = self._clean_scores(x, None, rows)
            else:
                frozen = _per_sample_target(target, n)
            grads = self._integrated_gradient(x, base, frozen, method, n_steps, rows)
            attribution = (x - base) * grads
            if not return_convergence_delta:
                return backend.to_framework(attribution)
            if scores_x is None:
                scores_x, _ = self._clean_scores(x, frozen, rows)
            scores_base, _ = self._clean_scores(base, frozen, rows)
        delta = backend.sum_per_sample(attribution) - (scores_x - scores_base).to(attribution.dtype)
        return backend.to_framework(attribution), backend.to_framework(delta)

    def make_baseline(self, baseline: BaselineSpec, x: torch.Tensor) -> torch.Tensor:
        """The baseline for the prepared (channel-first) ``x``; see
        :func:`~bbdecoder.attribution.baselines.make_baseline` (the Keras front end also takes
        channels-last arrays and callables on channels-last tensors)."""
        return make_baseline(baseline, x)

    # -- steps ------------------------------------------------------------------------------------
    def _integrated_gradient(
        self,
        x: torch.Tensor,
        base: torch.Tensor,
        target: TargetLike,
        method: str,
        n_steps: int,
        rows_per_pass: int,
    ) -> torch.Tensor:
        """``sum_s w_s dF/dx(x' + a_s (x - x'))`` shaped like ``x``; rows are step-major.

        The nodes and weights of each pass are computed for that pass only, so memory is bounded by
        ``rows_per_pass`` whatever ``n_steps`` is.
        """
        accumulated = torch.zeros_like(x)
        for chunk in path_chunks(base, x - base, method, n_steps, rows_per_pass):
            grad, _ = self.backend.input_gradient(chunk.path, _rows_of(target, chunk.sample), chunk.sample)
            add_weighted(accumulated, grad, chunk)
        return accumulated

    def _clean_scores(
        self, x: torch.Tensor, target: TargetLike, rows_per_pass: int
    ) -> tuple[torch.Tensor, TargetLike]:
        """Scores (N,) of ``x`` without gradients, and the target frozen to classes (callables kept)."""
        n = x.shape[0]
        scores: list[torch.Tensor] = []
        classes: list[torch.Tensor] = []
        is_callable = is_callable_target(target)
        with torch.no_grad():
            for start in range(0, n, rows_per_pass):
                stop = min(start + rows_per_pass, n)
                samples = torch.arange(start, stop)
                chunk_scores, chunk_classes = self.backend.evaluate(
                    x[start:stop], _rows_of(target, slice(start, stop)), samples
                )
                scores.append(chunk_scores)
                if not is_callable:
                    classes.append(chunk_classes)
        frozen: TargetLike = target if is_callable else torch.cat(classes)
        return torch.cat(scores), frozen

    # -- memory -----------------------------------------------------------------------------------
    def _rows_per_pass(self, x: torch.Tensor, internal_batch_size: int | None) -> int:
        if internal_batch_size is not None:
            check_positive_int(internal_batch_size, "internal_batch_size")
            return internal_batch_size
        budget = self.memory_budget_bytes or self.backend.default_memory_budget(x)
        # The probe forward is cached per sample shape: repeated calls (a dataset loop) skip it.
        key = (tuple(x.shape[1:]), x.dtype, x.device, budget)
        if key not in self._rows_cache:
            self._rows_cache[key] = self.backend.rows_for_budget(x, budget)
        return self._rows_cache[key]


def _rows_of(target: TargetLike, rows: slice | torch.Tensor) -> TargetLike:
    """The part of a per-sample class tensor or target list that belongs to ``rows`` (others: all rows)."""
    return target_rows(target, rows)


def _per_sample_target(target: TargetLike, n: int) -> TargetLike:
    """Check a class-sequence target's length up front (chunks only ever see slices of it)."""
    is_callable = is_callable_target(target)
    if target is None or isinstance(target, int) or is_callable:
        return target
    classes = torch.as_tensor(target)
    if classes.dim() == 0:
        return classes
    if classes.dim() != 1 or classes.shape[0] != n:
        raise TargetError(
            f"got {classes.numel()} targets of shape {tuple(classes.shape)} for a batch of {n}; "
            "give one class per sample, a single int, or None for the arg-max"
        )
    return classes
