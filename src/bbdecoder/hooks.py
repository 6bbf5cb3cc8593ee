"""The one place that registers hooks, and always removes them.

Every hook BBDecoder adds to a user's model goes through a :class:`HookManager` used as a context
manager, so the hooks are gone even when the forward or backward pass raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle


class HookManager:
    """Registers forward, pre-forward and tensor hooks and removes all of them on exit."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward_hook(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def forward_pre_hook(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self._handles.append(module.register_forward_pre_hook(hook))

    def tensor_hook(self, tensor: torch.Tensor, hook: Callable[[torch.Tensor], Any]) -> None:
        """Attach a gradient hook to ``tensor`` (kept here so it is removed with the rest)."""
        self._handles.append(tensor.register_hook(hook))

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_all()


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, eval_mode: bool | None = None) -> Iterator[nn.Module]:
    """Restore every module's ``training`` flag and every parameter's ``requires_grad`` on exit.

    ``eval_mode=True`` puts the whole model in eval mode for the duration (``False``: train mode,
    ``None``: as it is).

    Lazy modules (``nn.LazyLinear`` before its first forward): a forward inside the block materialises
    their parameters in place (the same parameter objects, the module turning into its regular
    class, PyTorch removing its own initialisation hooks). That is kept, as after any forward of the
    model, and the flags are restored on the materialised parameters. A parameter still uninitialised
    on exit (the block failed before reaching it) has its flag restored without touching its data, so
    the block's own exception is the one raised.
    """
    modes = [(module, module.training) for module in model.modules()]
    grads = [(param, param.requires_grad) for param in model.parameters()]
    try:
        if eval_mode is not None:
            model.train(not eval_mode)
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in grads:
            if is_lazy(param):
                param.requires_grad = requires_grad  # requires_grad_() refuses uninitialised data
            else:
                param.requires_grad_(requires_grad)


def count_hooks(model: nn.Module) -> int:
    """Number of module hooks currently registered anywhere in ``model`` (used by tests)."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(module, attr, {}))
    return total
