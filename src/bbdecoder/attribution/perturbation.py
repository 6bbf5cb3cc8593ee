"""Shared machinery of the perturbation methods (Occlusion, FeatureAblation, RISE, KernelSHAP).

A perturbation method scores many modified copies of each input without gradients. Each method
describes its copies as *rows* (a perturbed input plus the index of the sample it belongs to) made
chunk by chunk; :meth:`PerturbationExplainer.score_rows` runs them through the model in passes of at
most ``batch_size`` rows under ``torch.no_grad`` and returns one score per row. So memory is bounded by
``batch_size`` whatever the number of perturbations, and every sample keeps its own target.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer, InputTransform
from bbdecoder.backends.base import is_callable_target
from bbdecoder.targets import TargetLike, target_rows
from bbdecoder.validation import check_positive_int

RowMaker = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""``make(start, stop) -> (rows (stop - start, *sample_shape), sample index (stop - start,))``."""

SCORES = ("logit", "probability")
MAX_DEFAULT_BATCH = 512


class PerturbationExplainer(Explainer):
    """Base of the gradient-free methods: targets, batching, progress.

    Args:
        model: the classifier (never modified; no hook stays on it).
        input_transform, eval_mode, scores_from: as for every explainer (:class:`Explainer`).
        batch_size: most perturbed inputs per forward pass; default as many as fit the memory budget
            (one no-grad probe forward of one sample, at most 512).
        progress: a tqdm progress bar over the passes: ``True`` always, ``False`` never, ``None``
            (default) only when stderr is a terminal and there is more than one pass.
        score: ``"logit"`` (the target logit, or what a callable target returns) or ``"probability"``
            (the softmax probability of the target class).
    """

    default_score = "logit"

    def __init__(
        self,
        model: nn.Module,
        *,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        scores_from: str = "logits",
        batch_size: int | None = None,
        progress: bool | None = None,
        score: str | None = None,
    ) -> None:
        super().__init__(model, input_transform=input_transform, eval_mode=eval_mode, scores_from=scores_from)
        check_positive_int(batch_size, "batch_size", optional=True)
        score = self.default_score if score is None else score
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
        self.batch_size = batch_size
        self.progress = progress
        self.score = score

    # -- pieces the methods use ---------------------------------------------------------------------
    def clean_scores(self, x: torch.Tensor, target: TargetLike) -> tuple[torch.Tensor, TargetLike]:
        """Scores (N,) of the unperturbed inputs and the target frozen to classes (callables kept).

        Call inside :meth:`session`.
        """
        backend = self.backend
        with torch.no_grad():
            return backend.evaluate(x, backend.user_target(target), softmax=self.score == "probability")

    def score_rows(
        self, x: torch.Tensor, make: RowMaker, n_rows: int, target: TargetLike, *, what: str = "perturbations"
    ) -> torch.Tensor:
        """Scores (n_rows,) of the rows ``make`` builds, in passes of at most :meth:`rows_per_pass` rows.

        ``target`` is frozen (class tensor (N,) or a callable, which then sees batches of rows and
        must score each row on its own). Call inside :meth:`session`.
        """
        rows_per_pass = self.rows_per_pass(x)
        scores = torch.empty(n_rows, dtype=torch.float64, device=x.device)
        starts = range(0, n_rows, rows_per_pass)
        for start in self._progress(starts, len(starts), what):
            stop = min(start + rows_per_pass, n_rows)
            rows, samples = make(start, stop)
            scores[start:stop] = self.row_scores(rows, target, samples).to(torch.float64)
        return scores

    def rows_per_pass(self, x: torch.Tensor) -> int:
        if self.batch_size is not None:
            return self.batch_size
        with torch.no_grad():
            per_row = max(1, self.backend.activation_bytes_per_row(x))
        return max(1, min(MAX_DEFAULT_BATCH, self.backend.default_memory_budget(x) // per_row))

    def row_scores(self, rows: torch.Tensor, target: TargetLike, samples: torch.Tensor) -> torch.Tensor:
        """The score of each perturbed row (rows,) without gradients; ``target`` frozen per sample."""
        backend = self.backend
        with torch.no_grad():
            if _is_callable(target):
                return backend.target_scores(rows, target_rows(target, samples), samples).detach()
            assert isinstance(target, torch.Tensor)
            classes = target.to(samples.device)[samples]
            logits = backend.logits(rows, samples)
            if self.score == "probability":
                logits = logits.softmax(dim=1)
            return logits.gather(1, classes[:, None].to(logits.device)).squeeze(1).detach()

    # -- internals ----------------------------------------------------------------------------------
    def _progress(self, items: Iterable[int], total: int, what: str) -> Iterable[int]:
        show = self.progress if self.progress is not None else (total > 1 and sys.stderr.isatty())
        if not show:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, total=total, desc=f"{type(self).__name__}: {what}", unit="pass", leave=False)


def _is_callable(target: TargetLike) -> bool:
    return is_callable_target(target)


def broadcast_to_inputs(value: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    """A number or tensor broadcast to ``x``'s shape (a new tensor, on x's device and dtype)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} cannot be a bool")
    if isinstance(value, (int, float)):
        return torch.full_like(x, float(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a number or a tensor, got {type(value).__name__}")
    try:
        return torch.broadcast_to(value.detach().to(device=x.device, dtype=x.dtype), x.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{what} of shape {tuple(value.shape)} does not broadcast to the inputs' shape {tuple(x.shape)}"
        ) from None


def check_feature_mask(feature_mask: Any, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A feature mask broadcast to ``x`` (long ids 0..M-1) and M. ``None``: every element its own feature."""
    if feature_mask is None:
        ids = torch.arange(x[0].numel(), device=x.device).view(x.shape[1:])
        return ids.expand_as(x).clone(), int(x[0].numel())
    if not isinstance(feature_mask, torch.Tensor):
        raise TypeError(f"feature_mask must be an integer tensor, got {type(feature_mask).__name__}")
    if feature_mask.dtype.is_floating_point or feature_mask.dtype == torch.bool:
        raise TypeError(f"feature_mask must hold integer feature ids, got dtype {feature_mask.dtype}")
    mask = feature_mask.to(x.device)
    while mask.dim() < x.dim():
        mask = mask.unsqueeze(0)
    try:
        mask = torch.broadcast_to(mask, x.shape).long()
    except RuntimeError:
        raise ValueError(
            f"feature_mask of shape {tuple(feature_mask.shape)} does not broadcast to the inputs' shape "
            f"{tuple(x.shape)}; give (N or 1, C or 1, H, W) ids, e.g. superpixel labels"
        ) from None
    if int(mask.min()) < 0:
        raise ValueError("feature_mask ids must be >= 0")
    return mask, int(mask.max()) + 1
