"""The function graph: the operations a forward pass actually executed, in order.

Leaf modules appear as one node each (their inner ops are not expanded); functional operations
called outside leaf modules (``torch.flatten``, ``F.relu``, the ``+`` of a residual block, ...)
appear as op nodes. Edges follow the data: an edge ``a -> b`` means ``b`` consumed a tensor that
``a`` produced. Recorded with a ``TorchFunctionMode`` plus forward hooks, inside ``no_grad`` and
eval mode; the model is restored and every hook removed afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerIndex

_IGNORED_OPS = {"__get__", "__set__", "__setitem__", "size", "dim", "numel", "is_floating_point"}


@dataclass
class GraphNode:
    index: int
    kind: str  # "input", "module" or "op"
    name: str  # qualified module name, op name, or "input"
    type: str  # module class name, or the op's name
    shape: list[int] | None
    inputs: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.kind == "module":
            return f"{self.name} ({self.type})"
        return self.name


@dataclass
class FunctionGraph:
    """Executed operations in call order, with data-flow edges (``node.inputs``)."""

    nodes: list[GraphNode]

    @property
    def edges(self) -> list[tuple[int, int]]:
        return [(src, node.index) for node in self.nodes for src in node.inputs]

    def to_text(self) -> str:
        """One line per node: ``index: label shape <- inputs``."""
        lines = []
        for n in self.nodes:
            shape = "x".join(map(str, n.shape)) if n.shape is not None else "-"
            src = ", ".join(map(str, n.inputs))
            lines.append(f"{n.index:3d}: {n.label} [{shape}]" + (f" <- {src}" if src else ""))
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT source (render with ``dot -Tpng``)."""
        lines = ["digraph function_graph {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
        for n in self.nodes:
            style = ', style="rounded,filled", fillcolor="#dde8f5"' if n.kind == "module" else ""
            label = n.label.replace('"', r"\"")
            lines.append(f'  n{n.index} [label="{label}"{style}];')
        lines += [f"  n{a} -> n{b};" for a, b in self.edges]
        lines.append("}")
        return "\n".join(lines)

    def draw(self, path: str | Path) -> Path:
        """Save the graph as an image (matplotlib, one node per row; skip edges drawn as arcs)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.nodes)
        fig, ax = plt.subplots(figsize=(7, max(2.0, 0.35 * n)))
        for node in self.nodes:
            color = {"module": "#dde8f5", "op": "#f5e6d3", "input": "#e0f0e0"}[node.kind]
            ax.text(
                0,
                -node.index,
                node.label,
                ha="center",
                va="center",
                fontsize=7,
                bbox={"boxstyle": "round", "fc": color, "ec": "0.4"},
            )
        for a, b in self.edges:
            rad = 0.0 if b - a == 1 else 0.4
            ax.annotate(
                "",
                xy=(0, -b + 0.3),
                xytext=(0, -a - 0.3),
                arrowprops={"arrowstyle": "->", "color": "0.5", "connectionstyle": f"arc3,rad={rad}"},
            )
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-n, 1)
        ax.axis("off")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[GraphNode] = []
        self.producer: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique during the trace
        self.depth = 0

    def add(self, kind: str, name: str, type_: str, inputs: Any, outputs: Any) -> None:
        outs = _tensors(outputs)
        srcs = sorted({self.producer[id(t)] for t in _tensors(inputs) if id(t) in self.producer})
        node = GraphNode(len(self.nodes), kind, name, type_, list(outs[0].shape) if outs else None, srcs)
        self.nodes.append(node)
        for t in outs:
            self.producer[id(t)] = node.index
            self.keep.append(t)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if self.depth == 0 and name not in _IGNORED_OPS and _tensors(out):
            self.add("op", name, name, (args, kwargs), out)
        return out


def trace_graph(model: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> FunctionGraph:
    """Run ``model`` once on ``inputs`` (no_grad, eval mode, state restored) and record its graph."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    recorder = _Recorder()
    for t in args:
        recorder.add("input", "input", "input", (), t)
    index = LayerIndex(model)

    def pre(module: nn.Module, _inputs: Any) -> None:
        recorder.depth += 1

    def post(module: nn.Module, module_inputs: Any, output: Any) -> None:
        recorder.depth -= 1
        if recorder.depth == 0:
            layer = index.by_module(module)
            name = layer.display_name if layer is not None else type(module).__name__
            recorder.add("module", name, type(module).__name__, module_inputs, output)

    with HookManager() as hooks, preserved_state(model, eval_mode=True), torch.no_grad():
        for layer in index:
            hooks.forward_pre_hook(layer.module, pre)
            hooks.forward_hook(layer.module, post)
        with recorder:
            model(*args)
    return FunctionGraph(recorder.nodes)


_FUNCTIONAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "softplus": nn.functional.softplus,
    "elu": nn.functional.elu,
    "leaky_relu": nn.functional.leaky_relu,
    "relu6": nn.functional.relu6,
    "hardtanh": nn.functional.hardtanh,
    "mish": nn.functional.mish,
    "selu": torch.selu,
}
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention, nn.GLU)


def activation_curves(
    model: nn.Module,
    x_range: tuple[float, float] = (-6.0, 6.0),
    points: int = 241,
    graph: FunctionGraph | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (x, y)}``: each element-wise activation of the model evaluated on ``x_range``.

    Activation modules are found by type (one curve per distinct class and settings, named by the
    module's ``repr``); functional activations (``F.relu`` ...) are taken from ``graph`` when given.
    Modules are called through ``forward`` directly, so no hook fires and nothing is recorded.
    """
    x = torch.linspace(x_range[0], x_range[1], points)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        for module in model.modules():
            is_act = type(module).__module__ == "torch.nn.modules.activation"
            if not is_act or isinstance(module, _NOT_ELEMENTWISE) or repr(module) in curves:
                continue
            p = next(module.parameters(), None)
            xs = x.to(p) if p is not None else x
            if isinstance(module, nn.PReLU) and module.num_parameters > 1:
                xs = xs.unsqueeze(1).expand(-1, module.num_parameters)
                y = module.forward(xs)[:, 0]
            else:
                y = module.forward(xs)
            curves[repr(module)] = (x.numpy(), y.detach().double().cpu().numpy())
        for node in graph.nodes if graph is not None else []:
            fn = _FUNCTIONAL_ACTIVATIONS.get(node.name.removesuffix("_"))
            if node.kind == "op" and fn is not None and f"F.{node.name}" not in curves:
                curves[f"F.{node.name}"] = (x.numpy(), fn(x).double().numpy())
    return curves
