"""Per-layer cost: parameters, FLOPs (``torch.utils.flop_counter``), activation memory, forward time."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bbdecoder.attribution.memory import tensor_bytes
from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerIndex


@dataclass(frozen=True)
class LayerCost:
    """One leaf layer's cost for one forward pass of the example input.

    ``flops`` counts a multiply-add as 2 (PyTorch's flop counter convention; biases and element-wise
    ops are not counted), ``activation_bytes`` the bytes of its outputs, ``forward_ms`` the median
    wall time of its calls per forward pass, ``calls`` how often it ran.
    """

    id: int
    name: str
    type: str
    params: int
    flops: int
    activation_bytes: int
    forward_ms: float
    calls: int


def layer_costs(model: nn.Module, inputs: Any, *, repeats: int = 5, warmup: int = 1) -> list[LayerCost]:
    """Cost of every leaf layer (in ID order) for ``model(inputs)``, measured in eval mode, no grad.

    The model's modes are restored afterwards (eval mode keeps BatchNorm's running statistics from
    being updated by the measurement). ``inputs`` is a tensor or a tuple of positional arguments.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    index = LayerIndex(model)
    prefix = type(model).__name__
    with preserved_state(model, eval_mode=True), torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            calls, activation = _count_calls(model, index, args)
        flop_counts = counter.get_flop_counts()
        timings = _time_layers(model, index, args, repeats=repeats, warmup=warmup)
    costs = []
    for layer in index:
        key = f"{prefix}.{layer.name}" if layer.name else prefix
        flops = sum(flop_counts.get(key, {}).values())
        costs.append(
            LayerCost(
                id=layer.id,
                name=layer.display_name,
                type=layer.type_name,
                params=layer.num_params,
                flops=int(flops),
                activation_bytes=activation[layer.id],
                forward_ms=statistics.median(timings[layer.id]) if timings[layer.id] else 0.0,
                calls=calls[layer.id],
            )
        )
    return costs


def cost_frame(costs: list[LayerCost]) -> Any:
    """The costs as a pandas DataFrame, one row per layer."""
    import pandas as pd

    return pd.DataFrame([asdict(cost) for cost in costs])


def _count_calls(
    model: nn.Module, index: LayerIndex, args: tuple[Any, ...]
) -> tuple[dict[int, int], dict[int, int]]:
    calls: dict[int, int] = defaultdict(int)
    activation: dict[int, int] = defaultdict(int)
    with HookManager() as hooks:
        for layer in index:

            def record(_module: nn.Module, _inputs: Any, output: Any, layer_id: int = layer.id) -> None:
                calls[layer_id] += 1
                activation[layer_id] += tensor_bytes(output)

            hooks.forward_hook(layer.module, record)
        model(*args)
    return calls, activation


def _time_layers(
    model: nn.Module, index: LayerIndex, args: tuple[Any, ...], *, repeats: int, warmup: int
) -> dict[int, list[float]]:
    """Per repeat, the summed wall time of each layer's calls, in milliseconds."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started: dict[int, float] = {}
    current: dict[int, float] = defaultdict(float)
    samples: dict[int, list[float]] = defaultdict(list)
    with HookManager() as hooks:
        for layer in index:

            def before(_module: nn.Module, _inputs: Any, layer_id: int = layer.id) -> None:
                sync()
                started[layer_id] = time.perf_counter()

            def after(_module: nn.Module, _inputs: Any, _output: Any, layer_id: int = layer.id) -> None:
                sync()
                current[layer_id] += (time.perf_counter() - started[layer_id]) * 1e3

            hooks.forward_pre_hook(layer.module, before)
            hooks.forward_hook(layer.module, after)
        for repeat in range(warmup + repeats):
            current.clear()
            model(*args)
            if repeat >= warmup:
                for layer_id, elapsed in current.items():
                    samples[layer_id].append(elapsed)
    return samples


def plot_layer_costs(costs: list[LayerCost], path: str | Path) -> Path:
    """Bar charts of FLOPs and forward time per layer (layers with neither are left out); PNG."""
    from matplotlib import pyplot as plt

    from bbdecoder.viz.grids import save_figure

    shown = [cost for cost in costs if cost.flops or cost.forward_ms]
    labels = [f"{cost.id}: {cost.name}" for cost in shown]
    figure, (flops_axis, time_axis) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.28 * len(shown) + 1)))
    positions = range(len(shown))
    flops_axis.barh(positions, [cost.flops / 1e6 for cost in shown], color="tab:blue")
    flops_axis.set_xlabel("MFLOPs (multiply-add = 2)")
    time_axis.barh(positions, [cost.forward_ms for cost in shown], color="tab:orange")
    time_axis.set_xlabel("forward time, ms (median)")
    for axis in (flops_axis, time_axis):
        axis.set_yticks(list(positions))
        axis.set_yticklabels(labels if axis is flops_axis else [])
        axis.invert_yaxis()
    figure.suptitle("Per-layer cost")
    figure.tight_layout()
    return save_figure(figure, path)
