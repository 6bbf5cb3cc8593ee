"""What "target" means for every explainer.

* ``None``: each sample's arg-max class;
* an ``int``: that class for every sample;
* a sequence or 1-D tensor of length N: one class per sample (length and range checked);
* a callable ``f(output) -> Tensor (N,)``: any scalar per sample (segmentation, regression,
  multi-label, models returning tuples or dicts).

Models that return a tuple, list or dict need a callable target that picks the score; the error says
so. Scores are the raw outputs (logits), never a softmax: the decompositions are linear in them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

TargetLike = int | Sequence[int] | torch.Tensor | Callable[[Any], torch.Tensor] | None


class TargetError(ValueError):
    """A target that does not fit the model's output."""


def _as_logits(output: Any, batch_size: int) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        kind = type(output).__name__
        raise TargetError(
            f"the model returned a {kind}, not a tensor; pass `target` as a callable that picks one "
            "score per sample, e.g. target=lambda out: out[0][:, 3]"
        )
    if output.dim() == 0 or output.shape[0] != batch_size:
        raise TargetError(
            f"the model's output has shape {tuple(output.shape)} but the input batch has {batch_size} "
            "samples; did the input lack its batch dimension? (use x.unsqueeze(0) for one sample)"
        )
    if output.dim() != 2:
        raise TargetError(
            f"class targets need an output of shape (N, classes), got {tuple(output.shape)}; pass "
            "`target` as a callable f(output) -> (N,) for segmentation, regression or other outputs"
        )
    return output


def resolve_classes(output: Any, target: TargetLike, batch_size: int) -> torch.Tensor:
    """The class index per sample, shape (N,), long, on the output's device (not for callables)."""
    logits = _as_logits(output, batch_size)
    num_classes = logits.shape[1]
    if target is None:
        return logits.detach().argmax(dim=1)
    if isinstance(target, bool):
        raise TargetError("a target cannot be a bool")
    if isinstance(target, int):
        classes = torch.full((batch_size,), target, dtype=torch.long, device=logits.device)
    else:
        classes = torch.as_tensor(target, device=logits.device)
        if classes.dim() == 0:
            classes = classes.expand(batch_size)
        if classes.dim() != 1 or classes.shape[0] != batch_size:
            raise TargetError(
                f"got {classes.numel()} targets of shape {tuple(classes.shape)} for a batch of {batch_size}; "
                "give one class per sample, a single int, or None for the arg-max"
            )
        if classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise TargetError(f"class targets must be integers, got dtype {classes.dtype}")
        classes = classes.long()
    bad = (classes < 0) | (classes >= num_classes)
    if bool(bad.any()):
        raise TargetError(
            f"target class {int(classes[bad][0])} is out of range: the model has {num_classes} outputs "
            f"(valid classes 0..{num_classes - 1})"
        )
    return classes


def select_scores(output: Any, target: TargetLike, batch_size: int) -> torch.Tensor:
    """One differentiable score per sample, shape (N,)."""
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (batch_size,):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TargetError(f"a callable target must return a tensor of shape ({batch_size},), got {shape}")
        return scores
    classes = resolve_classes(output, target, batch_size)
    return output.gather(1, classes[:, None]).squeeze(1)


def fixed_target(output: Any, target: TargetLike, batch_size: int) -> TargetLike:
    """Freeze a target so it means the same on perturbed inputs (noise, IG paths).

    ``None`` becomes the arg-max classes of *this* output; callables are kept as they are.
    """
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    return resolve_classes(output, target, batch_size)
