"""What "target" means for every explainer.

* ``None``: each sample's arg-max class;
* an ``int``: that class for every sample;
* a sequence or 1-D tensor of length N: one class per sample (length and range checked);
* a callable ``f(output) -> Tensor (N,)``: any scalar per sample (segmentation, regression,
  multi-label, models returning tuples or dicts).

Models that return a Hugging Face ``ModelOutput``, a dict or a named tuple with a ``logits`` entry are
understood: class targets index ``output.logits``, and a callable target receives the whole output.
Other tuples, lists and dicts need a callable target that picks the score; the error says so. Scores
are the raw outputs (logits), never a softmax: the decompositions are linear in them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

TargetLike = int | Sequence[int] | torch.Tensor | Callable[[Any], torch.Tensor] | None


class TargetError(ValueError):
    """A target that does not fit the model's output."""


def logits_entry(output: Any) -> torch.Tensor | None:
    """The class-score tensor of a model output: the output itself, or its ``logits`` entry.

    A tensor is returned as it is; a ``ModelOutput`` (an ``OrderedDict`` with attributes), a dict or a
    named tuple gives its ``logits``; anything else gives ``None``.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def as_logits(output: Any, batch_size: int) -> torch.Tensor:
    """The checked (N, classes) score tensor of ``output`` (itself or its ``logits``); else TargetError."""
    logits = logits_entry(output)
    if logits is None:
        kind = type(output).__name__
        keys = f" (keys: {', '.join(map(str, output.keys()))})" if isinstance(output, Mapping) else ""
        raise TargetError(
            f"the model returned a {kind}{keys} with no `logits` entry, not a tensor; pass `target` as a "
            "callable that picks one score per sample, e.g. target=lambda out: out[0][:, 3]"
        )
    output = logits
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
    logits = as_logits(output, batch_size)
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
    return class_scores(output, classes)


def class_scores(output: Any, classes: torch.Tensor) -> torch.Tensor:
    """``logits[i, classes[i]]`` per sample (N,), from a tensor or an output with a ``logits`` entry."""
    logits = as_logits(output, classes.shape[0])
    return logits.gather(1, classes[:, None]).squeeze(1)


def fixed_target(output: Any, target: TargetLike, batch_size: int) -> TargetLike:
    """Freeze a target so it means the same on perturbed inputs (noise, IG paths).

    ``None`` becomes the arg-max classes of *this* output; callables are kept as they are.
    """
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    return resolve_classes(output, target, batch_size)
