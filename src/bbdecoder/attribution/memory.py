"""How many rows (samples x steps or noisy copies) one forward+backward pass may take."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer
from bbdecoder.hooks import HookManager

DEFAULT_CPU_BUDGET_BYTES = 512 * 2**20
CUDA_FREE_FRACTION = 0.5
# Bytes a row needs per byte of leaf-module outputs. Autograd keeps fewer tensors than the leaves
# return (in-place activations, views), and backward frees them as it goes: on a ResNet-18-shaped net
# a row measured 0.75x its leaf outputs (BENCHMARKS.md), so 1.5 keeps a 2x margin.
GRAD_MEMORY_FACTOR = 1.5


def default_memory_budget(device: torch.device) -> int:
    """Bytes a batch of path points may use: half the free memory on CUDA, 512 MiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return DEFAULT_CPU_BUDGET_BYTES


def activation_bytes_per_row(explainer: Explainer, inputs: torch.Tensor) -> int:
    """Bytes of the input and of every leaf module's outputs for one sample (one no-grad forward).

    Call inside ``explainer.session()`` so the probe sees the model in the mode it will run in.
    """
    one = inputs[:1].detach()
    total = [one.numel() * one.element_size() * (2 if explainer.input_transform is not None else 1)]

    def count(_module: nn.Module, _args: Any, output: Any) -> None:
        total[0] += tensor_bytes(output)

    leaves = [m for m in explainer.model.modules() if next(m.children(), None) is None]
    with HookManager() as hooks, torch.no_grad():
        for leaf in leaves:
            hooks.forward_hook(leaf, count)
        output = explainer.forward(one)
    return total[0] + tensor_bytes(output)


def rows_for_budget(explainer: Explainer, inputs: torch.Tensor, budget_bytes: int) -> int:
    """Rows per forward+backward pass that fit ``budget_bytes`` (at least 1)."""
    per_row = int(activation_bytes_per_row(explainer, inputs) * GRAD_MEMORY_FACTOR)
    return max(1, budget_bytes // max(1, per_row))


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or nested lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0
