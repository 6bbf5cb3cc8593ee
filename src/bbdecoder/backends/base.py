"""The backend protocol: everything an input-space attribution method asks of a model.

The methods (:mod:`bbdecoder.attribution`) are written once, in PyTorch, on **channel-first** torch
tensors ``(N, C, *spatial)`` (or ``(N, features)``). A backend stands between them and one framework:

* **layout** — :meth:`Backend.prepare` turns the user's batch into that tensor (validated, detached,
  its dtype kept); :meth:`Backend.to_framework` turns a result back into the user's format (the same
  tensor on PyTorch; a channels-last ``tf.Tensor`` on Keras) and :meth:`Backend.from_framework` is its
  inverse (for the results of a wrapped explainer, e.g. SmoothGrad around FullGrad);
* **targets** — :meth:`Backend.user_target` takes the user's ``target`` (whatever the framework calls
  a class list) to the shared form: ``None``, an ``int``, a torch class tensor, or a callable that the
  backend applies to the framework's *own* model output (a Keras callable sees ``tf`` tensors);
  :meth:`Backend.freeze` resolves it on a clean output into a :data:`FrozenTarget`;
* **the model** — :meth:`Backend.session` (modes kept, hooks removed), :meth:`Backend.logits`
  ``(rows, K)`` and :meth:`Backend.target_scores` ``(rows,)`` without gradients, and
  :meth:`Backend.input_gradient` (``d sum(scores) / d x``, one forward+backward);
* **memory** — :meth:`Backend.activation_bytes_per_row` (one probe forward of one sample), from which
  :meth:`Backend.rows_for_budget` applies the one shared rule (the same on every framework);
* **maps** — resize, per-sample min-max and per-sample sums, in torch (shared, not overridden).

Rows: methods run many rows per sample (path points, noisy copies, perturbations). A model call
takes the rows ``x`` and **the target of those rows** (the caller indexes a frozen per-sample target
with :meth:`Backend.rows_target`); ``samples`` ``(rows,)`` names the sample of each row (``None``: row
``i`` is sample ``i``) and only serves per-sample model arguments (PyTorch's
``additional_forward_args``). dtype and device are the prepared tensor's: float32 or float64 as
given; Keras tensors come to the CPU.

Layer-space pieces (layer activations and gradients for CAMs, bias gradients for FullGrad) are not
part of this protocol: they live beside it in ``backends/layers_*.py``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from bbdecoder.targets import TargetLike, as_target, class_scores, resolve_classes, target_rows

FrozenTarget = Any
"""A target frozen for row batches: a long class tensor ``(N,)`` on the inputs' device, or a callable
(kept as given; it sees the framework's model output of a batch of rows and scores each row alone)."""

Samples = torch.Tensor | None
"""``(rows,)`` long: the sample each row belongs to; ``None``: row ``i`` is sample ``i``."""


def is_callable_target(target: Any) -> bool:
    """A callable target (not a class tensor or array, which may be callable-looking objects)."""
    return callable(target) and not isinstance(target, torch.Tensor) and not hasattr(target, "__array__")


def channels_last(value: torch.Tensor) -> torch.Tensor:
    """``(N, C, *spatial)`` -> ``(N, *spatial, C)``; fewer than 3 dims: unchanged."""
    return value.movedim(1, -1) if value.dim() >= 3 else value


def channels_first(value: torch.Tensor) -> torch.Tensor:
    """``(N, *spatial, C)`` -> ``(N, C, *spatial)``; fewer than 3 dims: unchanged."""
    return value.movedim(-1, 1) if value.dim() >= 3 else value


class Backend(abc.ABC):
    """One framework's model, seen by the shared method code. Subclasses implement the abstract methods.

    Attributes:
        framework: ``"torch"`` or ``"keras"`` (the registry's ``frameworks`` names).
        model: the user's model, never modified.
    """

    framework: ClassVar[str]
    model: Any

    # -- layout ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, inputs: Any, min_dim: int = 2) -> torch.Tensor:
        """The user's batch as a detached, channel-first floating torch tensor; bad input raises."""

    @abc.abstractmethod
    def to_framework(self, value: torch.Tensor) -> Any:
        """A channel-first result (attribution, map ``(N, 1, *spatial)``, per-sample ``(N,)``) in the user's
        format: the tensor itself on PyTorch, a channels-last ``tf.Tensor`` on Keras."""

    @abc.abstractmethod
    def from_framework(self, value: Any) -> torch.Tensor:
        """The inverse of :meth:`to_framework` (a wrapped explainer's result as a channel-first tensor)."""

    def user_array(self, value: Any, rank: int) -> Any:
        """A user's array that broadcasts to the inputs (a baseline, a feature mask, a reference set) in
        the channel-first layout of inputs with ``rank`` dims; numbers, ``None`` and names unchanged."""
        return value

    def user_shape(self, value: Any, rank: int) -> Any:
        """A per-dim size (a window, strides) given over every non-batch dim of inputs with ``rank``
        dims, in the channel-first order; an int or a spatial-only tuple unchanged."""
        return value

    def user_target(self, target: Any) -> TargetLike:
        """The user's ``target`` in the shared form (``None``, int, torch class tensor, callable)."""
        return as_target(target)

    def target_to_framework(self, target: FrozenTarget) -> Any:
        """A frozen target in the form the framework's explainers take (to call a wrapped explainer)."""
        return target

    # -- the model -------------------------------------------------------------------------------
    @abc.abstractmethod
    def session(self) -> contextlib.AbstractContextManager[Any]:
        """The model in inference mode (restored on exit, every hook removed, also on errors)."""

    @abc.abstractmethod
    def logits(self, x: torch.Tensor, samples: Samples = None) -> torch.Tensor:
        """Class scores ``(rows, K)`` of the rows ``x`` without gradients (a ``TargetError`` when the
        output has no such tensor), as a torch tensor on ``x``'s device. Call inside :meth:`session`."""

    @abc.abstractmethod
    def target_scores(self, x: torch.Tensor, target: FrozenTarget, samples: Samples = None) -> torch.Tensor:
        """One score per row ``(rows,)`` without gradients. ``target``: the rows' target (a class tensor
        ``(rows,)``, an int, or a callable applied to the framework's output). Inside :meth:`session`."""

    @abc.abstractmethod
    def input_gradient(
        self, x: torch.Tensor, target: TargetLike, samples: Samples = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``d sum(scores) / d x`` shaped like ``x`` and the scores ``(rows,)`` (detached), from one
        forward+backward; no parameter gradient is computed. ``target`` is any target of the rows
        (``None``, an int, a class sequence ``(rows,)``, a callable). Call inside :meth:`session`."""

    # -- targets, from the pieces above ----------------------------------------------------------
    def freeze(self, x: torch.Tensor, target: TargetLike, samples: Samples = None) -> FrozenTarget:
        """``target`` frozen on the clean rows ``x``: ``None`` -> their arg-max classes, an int or a class
        sequence -> a checked long tensor ``(rows,)``; callables are kept. Call inside :meth:`session`."""
        target = as_target(target)
        if is_callable_target(target):
            return target
        return resolve_classes(self.logits(x, samples), target, x.shape[0])

    def evaluate(
        self, x: torch.Tensor, target: TargetLike, samples: Samples = None, *, softmax: bool = False
    ) -> tuple[torch.Tensor, FrozenTarget]:
        """The clean scores ``(rows,)`` and the frozen target of ``x`` from one forward without gradients.

        ``softmax``: class targets score the softmax probability instead of the logit (perturbation
        methods' ``score="probability"``). Call inside :meth:`session`.
        """
        target = as_target(target)
        if is_callable_target(target):
            return self.target_scores(x, target, samples), target
        logits = self.logits(x, samples)
        classes = resolve_classes(logits, target, x.shape[0])
        if softmax:
            logits = logits.softmax(dim=1)
        return class_scores(logits, classes).detach(), classes

    @staticmethod
    def rows_target(target: FrozenTarget, samples: Samples) -> FrozenTarget:
        """The part of a frozen target that belongs to rows of ``samples`` (others apply to every row)."""
        return target if samples is None else target_rows(target, samples)

    # -- memory ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def activation_bytes_per_row(self, x: torch.Tensor) -> int:
        """Bytes of one sample's input and of every leaf layer's *new* outputs (one probe forward without
        gradients; outputs that alias an input, such as in-place ReLUs and views, not counted)."""

    def default_memory_budget(self, x: torch.Tensor) -> int:
        """Bytes a pass may use by default: half the free CUDA memory, 1 GiB elsewhere."""
        from bbdecoder.attribution.memory import default_memory_budget

        return default_memory_budget(x.device)

    def rows_for_budget(self, x: torch.Tensor, budget_bytes: int | None = None) -> int:
        """Rows per forward+backward pass, the same rule on every framework: as many as fit the budget at
        ``GRAD_MEMORY_FACTOR`` bytes per activation byte, and on CPU no more than make
        ``CPU_PASS_TARGET_BYTES`` of activations (see :mod:`bbdecoder.attribution.memory`)."""
        from bbdecoder.attribution.memory import rows_from_bytes

        budget = self.default_memory_budget(x) if budget_bytes is None else budget_bytes
        return rows_from_bytes(self.activation_bytes_per_row(x), budget, cpu=x.device.type == "cpu")

    # -- maps (shared torch code, not overridden) --------------------------------------------------
    @staticmethod
    def resize(maps: torch.Tensor, size: tuple[int, ...], *, align_corners: bool) -> torch.Tensor:
        """``(N, C, *spatial)`` maps resized (linear, bilinear, trilinear) to ``size``."""
        from bbdecoder.attribution.postprocess import resize_to

        return resize_to(maps, size, align_corners=align_corners)

    @staticmethod
    def minmax_per_sample(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        """Each sample scaled to [0, 1] over all its non-batch dims jointly (constant samples to 0)."""
        from bbdecoder.attribution.postprocess import minmax_per_sample

        return minmax_per_sample(maps, eps)

    @staticmethod
    def sum_per_sample(values: torch.Tensor) -> torch.Tensor:
        """The sum over every non-batch dim, ``(N,)`` (completeness checks, convergence deltas)."""
        return values.reshape(values.shape[0], -1).sum(dim=1)

    @staticmethod
    def channel_sum(values: torch.Tensor) -> torch.Tensor:
        """``|values|`` summed over the channel dim: the ``(N, 1, *spatial)`` saliency of an attribution."""
        return values.abs().sum(dim=1, keepdim=True)


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    """A session that changes nothing (a framework whose calls never change the model's state)."""
    yield


__all__ = [
    "Backend",
    "FrozenTarget",
    "Samples",
    "channels_first",
    "channels_last",
    "is_callable_target",
    "nothing",
]
