"""What "target" means for every explainer.

* ``None``: each sample's arg-max class;
* an ``int``: that class for every sample;
* a sequence or 1-D tensor of length N: one class per sample (length and range checked);
* a callable ``f(output) -> Tensor (N,)``: any scalar per sample (segmentation, regression,
  multi-label, models returning tuples or dicts);
* a list of N target objects, one per sample, each called on *that sample's* output row
  (pytorch-grad-cam's convention: ``[ClassifierOutputTarget(3), ClassifierOutputTarget(5)]``, where
  ``ClassifierOutputTarget(c)(row) = row[c]``); see :class:`PerSampleTargets`. A single such object
  is a callable target: called on the whole output ``(N, C)``, ``output[:, c]`` is the same score.

Models that return a Hugging Face ``ModelOutput``, a dict or a named tuple with a ``logits`` entry are
understood: class targets index ``output.logits``, and a callable target receives the whole output.
Other tuples, lists and dicts need a callable target that picks the score; the error says so. Scores
are the raw outputs (logits), never a softmax: the decompositions are linear in them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

TargetLike = (
    int | Sequence[int] | torch.Tensor | Callable[[Any], torch.Tensor] | Sequence[Callable[[Any], Any]] | None
)


class TargetError(ValueError):
    """A target that does not fit the model's output."""


class PerSampleTargets:
    """One target object per sample, each called on that sample's output row alone.

    pytorch-grad-cam's convention: ``targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(5)]``
    scores sample 0 with ``t0(output[0])`` and sample 1 with ``t1(output[1])``; each call returns one
    scalar. The row is the model's output (or its ``logits`` entry) for that sample: ``(C,)`` for a
    classifier, ``(C, H, W)`` for a segmentation model. Calling the object on a batch output of N rows
    gives the N scores ``(N,)``, so it is a callable target everywhere; methods that score many rows per
    sample (IG paths, noisy copies, perturbations) select the objects of the rows' samples with
    :meth:`rows`. A list of such objects given as ``target`` is turned into this class by
    :func:`as_target`.
    """

    def __init__(self, targets: Sequence[Callable[[Any], Any]]) -> None:
        self.targets = list(targets)
        if not self.targets:
            raise TargetError("an empty list of per-sample targets; give one target object per sample")
        for index, item in enumerate(self.targets):
            if not callable(item) or isinstance(item, torch.Tensor):
                raise TargetError(
                    f"per-sample target {index} is a {type(item).__name__}, not a callable; give one target "
                    "object per sample (e.g. ClassifierOutputTarget(3)) or one class index per sample"
                )

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return f"PerSampleTargets({self.targets!r})"

    def __call__(self, output: Any) -> torch.Tensor:
        """The score of each sample from its own row, ``(N,)``."""
        rows = logits_entry(output)
        if rows is None:
            raise TargetError(
                f"per-sample target objects need a tensor output (or one with `logits`), got a "
                f"{type(output).__name__}; pass a callable f(output) -> (N,) instead"
            )
        if rows.dim() == 0 or rows.shape[0] != len(self.targets):
            raise TargetError(
                f"got {len(self.targets)} per-sample targets for a batch of "
                f"{rows.shape[0] if rows.dim() else 0}; give one target object per sample"
            )
        scores = []
        for index, (item, row) in enumerate(zip(self.targets, rows, strict=True)):
            value = item(row)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TargetError(
                    f"per-sample target {index} ({type(item).__name__}) must return one scalar tensor from "
                    f"its sample's output row of shape {tuple(row.shape)}, got {got}"
                )
            scores.append(value.reshape(()))
        return torch.stack(scores)

    def rows(self, index: torch.Tensor | slice) -> PerSampleTargets:
        """The objects of the given samples, in that order (a row batch's targets)."""
        if isinstance(index, slice):
            return PerSampleTargets(self.targets[index])
        return PerSampleTargets([self.targets[int(i)] for i in index.reshape(-1).tolist()])

    def repeat(self, copies: int) -> PerSampleTargets:
        """The objects for ``copies`` concatenated copies of the batch."""
        return PerSampleTargets(self.targets * copies)


def as_target(target: Any) -> Any:
    """``target`` with a list or tuple of target objects turned into :class:`PerSampleTargets`."""
    if (
        isinstance(target, (list, tuple))
        and target
        and all(callable(item) and not isinstance(item, torch.Tensor) for item in target)
    ):
        return PerSampleTargets(target)
    return target


def target_rows(target: TargetLike, rows: torch.Tensor | slice) -> TargetLike:
    """The target of a batch of rows: a per-sample class tensor or target list indexed by ``rows``.

    ``rows`` holds the sample of each row (or is a slice of samples); other targets apply to every row.
    """
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        return target[rows]
    if isinstance(target, PerSampleTargets):
        return target.rows(rows)
    return target


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
    target = as_target(target)
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
    target = as_target(target)
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    return resolve_classes(output, target, batch_size)
