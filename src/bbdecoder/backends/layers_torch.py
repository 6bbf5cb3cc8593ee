"""The PyTorch layer backend: forward hooks with tensor hooks attached in them, never module backward hooks.

Layer outputs are read with a forward hook; their gradients with ``output.register_hook`` attached in
that hook (module backward hooks break in-place ReLU). Every hook lives in the explainer's session,
which removes them and restores modes, ``requires_grad`` and (with ``eval_mode=False``) the BatchNorm
running statistics, also when a pass raises. Bias layers (``Conv*d``, ``Linear``, ``BatchNorm*d``) are
matched to gradients by module; one with its own ``forward`` (timm's ``BatchNormAct2d``) is read where
its primitive added the bias (see :mod:`bbdecoder.attribution.bias_layers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

from bbdecoder.attribution.base import has_lazy_buffers, leaf_input, reset_materialised_lazy_norms
from bbdecoder.attribution.bias_layers import (
    PrimitiveCapture,
    UnreachableBiasError,
    broadcast_bias,
    effective_bias,
    is_bias_layer,
    is_stock_layer,
)
from bbdecoder.attribution.keywords import expand_forward_args
from bbdecoder.attribution.outputs import model_output
from bbdecoder.backends.layers_base import BiasHandler, LayerCapture, LayerRef, Replacement
from bbdecoder.hooks import HookManager
from bbdecoder.layers import find_modules
from bbdecoder.targets import TargetLike, fixed_target, select_scores, target_rows
from bbdecoder.validation import check_batch

if TYPE_CHECKING:
    from bbdecoder.attribution.base import Explainer


class TorchLayers:
    """The :class:`~bbdecoder.backends.layers_base.LayerBackend` of an ``nn.Module`` explainer."""

    framework = "torch"

    def __init__(self, explainer: Explainer) -> None:
        self.explainer = explainer

    @property
    def model(self) -> nn.Module:
        return self.explainer.model

    # -- boundary ---------------------------------------------------------------------------------
    def check_inputs(self, inputs: Any, min_dim: int) -> torch.Tensor:
        result: torch.Tensor = check_batch(inputs, min_dim=min_dim, model=self.model)
        return result

    def to_native_map(self, maps: torch.Tensor) -> torch.Tensor:
        return maps

    def sample_shape(self, native: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(s) for s in native)

    def native_to_channel_first(self, tensor: torch.Tensor, input_dims: int) -> torch.Tensor:
        return tensor

    def reference_tensor(self) -> torch.Tensor:
        return next(self.model.parameters(), torch.empty(0))

    # -- layers -----------------------------------------------------------------------------------
    def find_layers(self, selection: Any) -> list[LayerRef]:
        return [LayerRef(name, module) for name, module in find_modules(self.model, selection)]

    def default_layers(self, cam: Any, inputs: torch.Tensor) -> list[LayerRef]:
        from bbdecoder.attribution.cam.default_layer import find_default_layer

        with self.session() as hooks, torch.no_grad():
            return [LayerRef(name, module) for name, module in find_default_layer(cam, hooks, inputs)]

    @contextlib.contextmanager
    def session(self) -> Iterator[HookManager]:
        """The explainer's session, and with ``eval_mode=False`` every buffer of a module in train mode
        restored (BatchNorm's running statistics), so explaining never changes the model."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        lazy: list[_NormBase] = []
        if not self.explainer.eval_mode:
            for module in self.model.modules():
                if not module.training:
                    continue
                if isinstance(module, _NormBase) and has_lazy_buffers(module):
                    lazy.append(module)
                    continue
                saved.extend((b, b.detach().clone()) for b in module.buffers(recurse=False) if not is_lazy(b))
        try:
            with self.explainer.session() as hooks:
                yield hooks
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
            reset_materialised_lazy_norms(lazy)

    progress_session = session

    def capture(
        self, inputs: torch.Tensor, target: TargetLike, layers: Sequence[LayerRef], *, gradients: bool
    ) -> tuple[list[LayerCapture], TargetLike]:
        method = getattr(self.explainer, "method_name", type(self.explainer).__name__)
        n = len(layers)
        raw: list[torch.Tensor | None] = [None] * n
        live: list[torch.Tensor | None] = [None] * n
        versions = [0] * n
        calls = [0] * n
        grads: list[torch.Tensor | None] = [None] * n
        x = leaf_input(inputs) if gradients else inputs.detach()
        with self.session() as hooks:

            def make_hook(i: int, name: str) -> Callable[..., None]:
                def forward_hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                    if not isinstance(output, torch.Tensor):
                        raise TypeError(
                            f"{method} needs a layer with a tensor output; layer "
                            f"{name or '(root)'!r} returned a {type(output).__name__}"
                        )
                    calls[i] += 1
                    call = calls[i]
                    # A copy: an in-place op after this layer (ReLU(inplace=True)) would change A.
                    raw[i] = output.detach().clone()
                    live[i], versions[i] = output, output._version
                    if gradients and output.requires_grad:

                        def grad_hook(grad: torch.Tensor) -> None:
                            if call == calls[i]:  # only the last call's gradient is kept
                                grads[i] = grad.detach()

                        hooks.tensor_hook(output, grad_hook)

                return forward_hook

            for i, ref in enumerate(layers):
                hooks.forward_hook(ref.layer, make_hook(i, ref.name))
            if gradients:
                scores, output = self.explainer.scores(x, target)
            else:
                with torch.no_grad():
                    output = self.explainer.forward(x)
                scores = None
            for i, ref in enumerate(layers):
                if calls[i] == 0:
                    raise RuntimeError(
                        f"the {method} layer {ref.name or '(root)'!r} did not run in the forward pass; "
                        "choose a layer that the model calls"
                    )
            frozen = fixed_target(output, target, inputs.shape[0])
            if scores is not None:
                _backward(scores, x, live, versions)
        captures = []
        for i, ref in enumerate(layers):
            raw_i = raw[i]
            assert raw_i is not None
            grad = grads[i]
            if gradients and grad is None:
                grad = torch.zeros_like(raw_i)  # the score does not depend on this layer's output
            captures.append(LayerCapture(ref.name, ref.layer, raw_i, grad, calls[i]))
        return captures, frozen

    def row_scores(
        self,
        batch: torch.Tensor,
        samples: torch.Tensor,
        target: TargetLike,
        replacement: Replacement | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            if replacement is not None:
                seen = [0]

                def hook(_module: nn.Module, _args: Any, _output: Any) -> torch.Tensor | None:
                    seen[0] += 1
                    return replacement.value if seen[0] == replacement.call else None

                with HookManager() as row_hooks:
                    row_hooks.forward_hook(replacement.layer, hook)
                    output = self.explainer.forward(batch, samples[: batch.shape[0]])
            else:
                output = self.explainer.forward(batch, samples[: batch.shape[0]])
            # frozen classes or target objects, one per sample
            on = target.device if isinstance(target, torch.Tensor) else samples.device
            row_target = target_rows(target, samples.to(on))
            return select_scores(output, row_target, samples.shape[0]).detach()

    # -- bias layers ------------------------------------------------------------------------------
    def bias_layers(self) -> list[LayerRef]:
        return [
            LayerRef(name, module) for name, module in self.model.named_modules() if is_bias_layer(module)
        ]

    def model_input(self, inputs: torch.Tensor) -> torch.Tensor:
        transform = self.explainer.input_transform
        if transform is None:
            return inputs
        with torch.no_grad():
            return transform(inputs)

    def backward_through_biases(
        self, x: torch.Tensor, target: TargetLike, handler: BiasHandler, *, strict: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = leaf_input(x)
        captures: list[PrimitiveCapture] = []
        explainer = self.explainer
        try:
            with explainer.session() as hooks:
                for ref in self.bias_layers():
                    if is_stock_layer(ref.layer):
                        hooks.forward_hook(ref.layer, _forward_hook(ref.name, hooks, handler))
                    else:
                        pre_hook, hook = _capture_hooks(ref.name, hooks, handler, captures, strict)
                        hooks.forward_pre_hook(ref.layer, pre_hook)
                        hooks.forward_hook(ref.layer, hook)
                scores_from = getattr(explainer, "scores_from", "logits")
                output = model_output(self.model, x, scores_from, args=expand_forward_args(x.shape[0]))
                scores = select_scores(output, target, x.shape[0])
                (input_gradient,) = torch.autograd.grad(scores.sum(), x)
        finally:
            # A forward that raised inside a fused layer leaves its capture mode on the stack.
            while captures:
                captures.pop().__exit__(None, None, None)
        return input_gradient, scores.detach()


def _backward(
    scores: torch.Tensor, x: torch.Tensor, live: list[torch.Tensor | None], versions: list[int]
) -> None:
    outputs = [t for t in live if t is not None and t.requires_grad]
    if outputs and all(t is not None and t._version == v for t, v in zip(live, versions, strict=True)):
        # The backward stops at the layers: nothing below them is differentiated.
        torch.autograd.grad(scores.sum(), outputs, allow_unused=True)
    else:
        # A layer output was changed in place after the hook; its tensor hook holds the gradient
        # of the value the hook saw, which only a backward through the in-place op reaches.
        torch.autograd.grad(scores.sum(), x, allow_unused=True)


def _hook_biased_tensor(
    name: str, module: nn.Module, output: torch.Tensor, hooks: HookManager, handler: BiasHandler
) -> None:
    bias = effective_bias(module)
    if bias is None or not output.requires_grad:
        return
    bias = broadcast_bias(module, bias.to(output.dtype), output)

    def on_gradient(grad: torch.Tensor) -> None:
        handler(name, bias, grad)

    hooks.tensor_hook(output, on_gradient)


def _forward_hook(name: str, hooks: HookManager, handler: BiasHandler) -> Callable[..., None]:
    def forward_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            _hook_biased_tensor(name, module, output, hooks, handler)

    return forward_hook


def _capture_hooks(
    name: str, hooks: HookManager, handler: BiasHandler, captures: list[PrimitiveCapture], strict: bool
) -> tuple[Callable[..., None], Callable[..., None]]:
    """Hooks for a bias layer with its own forward: the bias is read where the primitive added it."""

    def pre_hook(module: nn.Module, _inputs: Any) -> None:
        def on_output(biased: torch.Tensor) -> None:
            _hook_biased_tensor(name, module, biased, hooks, handler)

        capture = PrimitiveCapture(module, on_output)
        capture.__enter__()
        captures.append(capture)

    def forward_hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        capture = captures.pop()
        capture.__exit__(None, None, None)
        if capture.count or effective_bias(module) is None:
            return
        if strict:
            raise UnreachableBiasError(name, module)
        if isinstance(output, torch.Tensor):
            _hook_biased_tensor(name, module, output, hooks, handler)

    return pre_hook, forward_hook


__all__ = ["TorchLayers"]
