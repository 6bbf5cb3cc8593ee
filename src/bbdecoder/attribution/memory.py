"""How many rows (samples x steps or noisy copies) one forward+backward pass may take."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer
from bbdecoder.hooks import HookManager

DEFAULT_CPU_BUDGET_BYTES = 1024 * 2**20
CUDA_FREE_FRACTION = 0.5
# Bytes a row needs per byte of *new* leaf-module outputs (in-place results and views not counted).
# Measured peak RSS per row (bench/bench_ig_rows.py --memory): 0.95-1.0x on the ResNet-50 layout at
# 224 px, 1.1-1.6x on the ResNet-18 layout at 64 px (fixed costs spread over few small rows).
GRAD_MEMORY_FACTOR = 1.5
# On CPU a forward+backward pass is fastest per row when its new leaf outputs total a few hundred MiB:
# smaller passes pay per-op overheads (and thread synchronisation, which under load dominates), larger
# ones page-fault fresh memory and fall out of cache. Measured on the ResNet-50 layout, 1 thread:
# best at 8 rows (224 px, 86 MiB/row) and 16 rows (112 px, 22 MiB/row); 50 rows at 224 px (Captum's
# default for one image at 50 steps) cost 1.8x as much per row (BENCHMARKS.md).
CPU_PASS_TARGET_BYTES = 512 * 2**20


def default_memory_budget(device: torch.device) -> int:
    """Bytes a batch of path points may use: half the free memory on CUDA, 1 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return DEFAULT_CPU_BUDGET_BYTES


def activation_bytes_per_row(explainer: Explainer, inputs: torch.Tensor) -> int:
    """Bytes of the input and of every leaf module's *new* outputs for one sample (one no-grad forward).

    An output that shares storage with one of the module's inputs (an in-place ReLU, a view such as
    Flatten, Identity or eval-mode Dropout) allocates nothing and is not counted. Call inside
    ``explainer.session()`` so the probe sees the model in the mode it will run in.
    """
    one = inputs[:1].detach()
    total = [one.numel() * one.element_size() * (2 if explainer.input_transform is not None else 1)]

    def count(_module: nn.Module, args: Any, output: Any) -> None:
        shared = {_storage_of(arg) for arg in args if isinstance(arg, torch.Tensor)}
        total[0] += tensor_bytes(output, exclude=shared)

    leaves = [m for m in explainer.model.modules() if next(m.children(), None) is None]
    with HookManager() as hooks, torch.no_grad():
        for leaf in leaves:
            hooks.forward_hook(leaf, count)
        output = explainer.forward(one)
    return total[0] + tensor_bytes(output)


def rows_for_budget(explainer: Explainer, inputs: torch.Tensor, budget_bytes: int) -> int:
    """Rows per forward+backward pass: as many as fit ``budget_bytes`` (at least 1), and on CPU no more
    than make :data:`CPU_PASS_TARGET_BYTES` of new activations, where passes are fastest per row."""
    return rows_from_bytes(
        activation_bytes_per_row(explainer, inputs), budget_bytes, cpu=inputs.device.type == "cpu"
    )


def rows_from_bytes(bytes_per_row: int, budget_bytes: int, *, cpu: bool) -> int:
    """The rule of :func:`rows_for_budget` from a measured ``bytes_per_row`` (shared by every backend)."""
    leaf_bytes = max(1, int(bytes_per_row))
    rows = max(1, budget_bytes // int(leaf_bytes * GRAD_MEMORY_FACTOR))
    if cpu:
        rows = min(rows, max(1, math.ceil(CPU_PASS_TARGET_BYTES / leaf_bytes)))
    return int(rows)


def tensor_bytes(value: Any, exclude: set[int] | None = None) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or nested lists, tuples and dicts of them).

    Tensors whose storage address is in ``exclude`` are not counted.
    """
    if isinstance(value, torch.Tensor):
        if exclude and _storage_of(value) in exclude:
            return 0
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, exclude) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, exclude) for v in value.values())
    return 0


def _storage_of(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
        return -id(tensor)
