"""The shared base of every explainer: model handling, targets, one forward+backward.

A method is a small subclass that overrides :meth:`Explainer.attribute` (input-space methods) and,
where its map is not simply ``|attribution|`` summed over channels, :meth:`Explainer.saliency`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from bbdecoder.attribution.keywords import checked_keywords, expand_forward_args, forwards_keywords
from bbdecoder.attribution.layer_attribution import LayerSpec, resolve_layer, uses_layer
from bbdecoder.attribution.outputs import check_scores_from, model_output
from bbdecoder.attribution.token_inputs import explain_continuation, token_sum
from bbdecoder.backends.base import Backend
from bbdecoder.backends.torch_core import TorchBackend
from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.targets import TargetLike, fixed_target, select_scores
from bbdecoder.validation import check_batch

InputTransform = Callable[[torch.Tensor], torch.Tensor]


class Explainer:
    """Base class: holds the model and never mutates it.

    Args:
        model: any ``nn.Module`` returning logits ``(N, classes)`` (or anything, with a callable target).
        input_transform: applied to the inputs inside every forward pass, e.g. :class:`Normalize`.
            Attributions are then taken with respect to the *untransformed* inputs (pixel space), so
            a "black" baseline really is black. ``None``: inputs go to the model as they are.
        eval_mode: run the model in eval mode (BatchNorm running statistics, no dropout) and restore
            every module's mode afterwards. ``False`` keeps the model's current modes.
        scores_from: ``"logits"`` (default): a final ``nn.Softmax``/``nn.LogSoftmax``/``nn.Sigmoid``
            module is looked through and its input, the logits, explained; an output that is
            probabilities without such a module raises
            :class:`~bbdecoder.attribution.outputs.ProbabilityOutputError`. ``"output"``: explain what
            the model returns, as it is. See :mod:`bbdecoder.attribution.outputs`.
        layer: attribute at this module's output instead of at the input (Captum's ``Layer*``
            methods): a module, a qualified name or a glob matching one module. Integer inputs (token
            ids) and dict inputs default to the model's ``get_input_embeddings()``. See
            :mod:`bbdecoder.attribution.layer_attribution`.

    Every ``attribute`` / ``saliency`` also takes the peers' spellings (Captum's ``baselines=`` and
    ``additional_forward_args=``, pytorch-grad-cam's ``targets=`` and per-sample target objects) and
    refuses an unknown keyword with a ``TypeError`` naming the nearest valid one; see
    :mod:`bbdecoder.attribution.keywords`.
    """

    _checked_methods = ("attribute", "saliency", "__call__", "layer_map", "layer_maps")

    extra_keywords: tuple[str, ...] = ()
    """Keywords a subclass's method reads out of ``**kwargs`` itself (let through by the check)."""

    def keywords_for(self, inputs: Any) -> tuple[str, ...]:
        """Keywords read out of ``**kwargs`` for these inputs: :attr:`extra_keywords`, and at a layer
        (``layer=``, token ids, dict inputs) the token options of
        :mod:`bbdecoder.attribution.layer_attribution`."""
        from bbdecoder.attribution.layer_attribution import TOKEN_OPTIONS

        return tuple(self.extra_keywords) + (TOKEN_OPTIONS if uses_layer(self, inputs) else ())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls._checked_methods:
            method = cls.__dict__.get(name)
            if callable(method):
                setattr(cls, name, checked_keywords(method))

    def __init__(
        self,
        model: nn.Module,
        *,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        scores_from: str = "logits",
        layer: LayerSpec = None,
    ) -> None:
        self.model = self._check_model(model)
        self.input_transform = input_transform
        self.eval_mode = eval_mode
        self.scores_from = check_scores_from(scores_from)
        # Not ``self.layer``: the CAM family has its own ``layer`` property (the map's layer).
        self.attribution_layer = layer
        if layer is not None:
            self._check_layer(layer)
        self.backend: Backend = self._make_backend()

    # -- the framework (overridden by the Keras front end, bbdecoder.keras.front) -----------------
    def _check_model(self, model: Any) -> Any:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        return model

    def _check_layer(self, layer: LayerSpec) -> None:
        resolve_layer(self.model, layer)

    def _make_backend(self) -> Backend:
        """The backend the shared method code runs on (:mod:`bbdecoder.backends`)."""
        return TorchBackend(self)

    # -- pieces subclasses use -------------------------------------------------------------------
    def validate_inputs(self, inputs: Any, min_dim: int = 2) -> torch.Tensor:
        """:func:`check_inputs` with this explainer's model: call first, before any probe pass."""
        return check_inputs(inputs, min_dim, model=self.model)

    @contextlib.contextmanager
    def session(self) -> Iterator[HookManager]:
        """Model in the requested mode, grad enabled, hooks registered through the yielded manager.

        Modes, ``requires_grad`` flags and hooks are restored/removed on exit, also on errors. With
        ``eval_mode=False`` the forward passes run in the model's own modes, and a BatchNorm in train
        mode updates its running statistics: those buffers are restored exactly on exit, so explaining
        never changes the model.
        """
        eval_mode = True if self.eval_mode else None
        with (
            preserved_state(self.model, eval_mode=eval_mode),
            preserved_running_stats(self.model, active=not self.eval_mode),
            HookManager() as hooks,
            torch.enable_grad(),
        ):
            yield hooks

    def forward(self, inputs: torch.Tensor, samples: torch.Tensor | None = None) -> Any:
        """The model's output for ``inputs`` (the input transform applied; see ``scores_from``).

        ``samples`` (rows,): the sample each row belongs to, for per-sample
        ``additional_forward_args``; ``None``: rows ``0..rows-1`` (modulo the batch size).
        """
        x = self.input_transform(inputs) if self.input_transform is not None else inputs
        return model_output(self.model, x, self.scores_from, args=expand_forward_args(x.shape[0], samples))

    def scores(self, inputs: torch.Tensor, target: TargetLike) -> tuple[torch.Tensor, Any]:
        """One differentiable score per sample (N,), and the raw output."""
        try:
            output = self.forward(inputs)
        except Exception as err:
            # PyTorch layers accept unbatched (C, H, W) input, so a forgotten batch dimension often
            # fails deep inside the model with a message that does not say so.
            if inputs.dim() == 3 and hasattr(err, "add_note"):
                err.add_note(
                    "bbdecoder: the inputs have 3 dims; if this is one image (C, H, W), add the batch "
                    "dimension with x.unsqueeze(0)"
                )
            raise
        return select_scores(output, target, inputs.shape[0]), output

    def freeze_target(self, inputs: torch.Tensor, target: TargetLike) -> TargetLike:
        """Resolve ``None`` to the arg-max classes of the clean inputs (for noisy/path methods)."""
        if target is not None and callable(target) and not isinstance(target, torch.Tensor):
            return target
        with self.session(), torch.no_grad():
            output = self.forward(inputs)
        return fixed_target(output, target, inputs.shape[0])

    def input_gradient(self, inputs: torch.Tensor, target: TargetLike) -> tuple[torch.Tensor, torch.Tensor]:
        """dScore/dInput shaped like ``inputs``, and the scores (N,), from one forward+backward.

        Only the input gradient is computed: parameter gradients are neither computed nor touched.
        Call inside :meth:`session`.
        """
        x = leaf_input(inputs)
        scores, _ = self.scores(x, target)
        (grad,) = torch.autograd.grad(scores.sum(), x)
        return grad, scores.detach()

    # -- the public interface --------------------------------------------------------------------
    @checked_keywords
    def attribute(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """Attribution shaped like ``inputs`` (N, C, *spatial)."""
        raise NotImplementedError(f"{type(self).__name__} has no input-space attribution")

    @checked_keywords
    @forwards_keywords(lambda self: self.attribute)
    def saliency(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """Non-negative map (N, 1, *spatial) at input resolution: ``|attribution|`` summed over channels.

        Token inputs (ids, a dict, or ``layer=`` given): ``|token_scores|``, shaped ``(N, L)``.
        """
        if uses_layer(self, inputs):
            return self.token_scores(inputs, target, **kwargs).abs()
        backend = self.backend
        attribution = backend.from_framework(self.attribute(inputs, target, **kwargs))
        return backend.to_framework(backend.channel_sum(attribution))

    def token_scores(self, inputs: Any, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """One signed score per token ``(N, L)``: :meth:`attribute` at the layer summed over ``D``.

        ``inputs``: token ids ``(N, L)`` or a dict of keyword tensors; the layer is ``layer=`` (default:
        the input embeddings). Padding positions (``attention_mask == 0``) are exactly zero.
        """
        result = self.attribute(inputs, target, **kwargs)
        if isinstance(result, tuple):
            result = result[0]
        return token_sum(result)

    def explain_continuation(self, inputs: Any, continuation: Any, **kwargs: Any) -> torch.Tensor:
        """Token scores ``(T, L)`` for each of the ``T`` tokens of ``continuation`` after a prompt.

        See :func:`bbdecoder.attribution.token_inputs.explain_continuation`.
        """
        return explain_continuation(self, inputs, continuation, **kwargs)

    def __call__(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        return self.attribute(inputs, target, **kwargs)


def check_inputs(inputs: Any, min_dim: int = 2, *, model: nn.Module | None = None) -> torch.Tensor:
    """Validate a batch once, before any probe: a finite floating tensor (N, ...) with its batch dim.

    With ``model``, one sample without its batch dimension (``(C, H, W)`` for a Conv2d model) is
    refused with the fix; see :func:`bbdecoder.validation.check_batch`.
    """
    result: torch.Tensor = check_batch(inputs, min_dim=min_dim, model=model)
    return result


@contextlib.contextmanager
def preserved_running_stats(model: nn.Module, *, active: bool = True) -> Iterator[None]:
    """Restore the running statistics of every normalisation layer on exit, bit for bit.

    ``running_mean``, ``running_var`` and ``num_batches_tracked`` of each ``BatchNorm``/``InstanceNorm``
    that tracks them are copied before and written back after (in place, so tensors the user holds stay
    valid), also when the body raises. ``active=False`` does nothing (eval mode never updates them).
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    lazy: list[_NormBase] = []
    if active:
        for module in model.modules():
            if isinstance(module, _NormBase) and module.track_running_stats:
                if has_lazy_buffers(module):
                    lazy.append(module)
                    continue
                for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                    if isinstance(buffer, torch.Tensor):
                        saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        reset_materialised_lazy_norms(lazy)


def has_lazy_buffers(module: nn.Module) -> bool:
    """Whether ``module`` (a ``LazyBatchNorm2d`` before its first forward) holds uninitialised buffers."""
    return any(is_lazy(b) for b in module.buffers(recurse=False))


def reset_materialised_lazy_norms(modules: list[_NormBase]) -> None:
    """A lazy norm layer that had no statistics before the call and was materialised by it gets the
    statistics of a fresh layer (``reset_running_stats``): what its first real forward would have found."""
    for module in modules:
        if not has_lazy_buffers(module):
            module.reset_running_stats()


def leaf_input(inputs: torch.Tensor) -> torch.Tensor:
    """A detached leaf copy-free view of ``inputs`` that requires grad (inference tensors are cloned)."""
    x = inputs.detach()
    if x.is_inference():
        x = x.clone()
    return x.requires_grad_(True)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dim 1); pass as ``input_transform`` to explain in pixel space."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Any, std: Any) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = self.mean.to(x).view(shape)
        std = self.std.to(x).view(shape)
        return (x - mean) / std
