"""The layer table, the output shapes behind it and the function graph (a mixin of the Analyzer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerIndex, LayerInfo
from bbdecoder.monitor.graph import FunctionGraph, activation_curves, trace_graph
from bbdecoder.store.vocabulary import GRAPH_DOT, GRAPH_TEXT


def probe_shapes(model: nn.Module, index: LayerIndex, input_size: tuple[int, ...]) -> dict[int, list[int]]:
    """``{layer id: output shape}`` of one eval-mode forward on zeros of ``input_size`` (model restored)."""
    shapes: dict[int, list[int]] = {}
    ref = next(model.parameters(), None)
    x = torch.zeros(input_size, device=ref.device if ref is not None else None)

    def make(layer: LayerInfo) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and layer.id not in shapes:
                shapes[layer.id] = list(out.shape)

        return hook

    with HookManager() as hooks, preserved_state(model, eval_mode=True), torch.no_grad():
        for layer in index:
            hooks.forward_hook(layer.module, make(layer))
        try:
            model(x)
        except Exception as err:
            raise ValueError(
                f"a forward pass on zeros of input_size={tuple(input_size)} failed ({err}); pass the "
                "size of one input batch, e.g. (1, 3, 32, 32), or input_size=None"
            ) from err
    return shapes


class SummaryMixin:
    """``summary`` and ``function_graph``."""

    def function_graph(self: Any, inputs: Any, save_folder: str | Path | None = None) -> FunctionGraph:
        """Trace the executed operations on ``inputs`` (model restored, nothing recorded), store the
        graph as the ``graph.txt`` and ``graph.dot`` artifacts and, with ``save_folder``, save
        ``function_graph.png`` and ``activation_curves.png`` there."""
        self._check_open()
        with self.paused():
            graph = trace_graph(self.model, inputs)
        self.writer.set_artifact(GRAPH_TEXT, "text", graph.to_text())
        self.writer.set_artifact(GRAPH_DOT, "dot", graph.to_dot())
        if save_folder is not None:
            from bbdecoder.viz.monitor_plots import plot_activation_curves

            graph.draw(Path(save_folder) / "function_graph.png")
            plot_activation_curves(activation_curves(self.model, graph=graph), Path(save_folder))
        return graph

    def summary(self: Any, print_table: bool = True, *, cost: bool = False) -> str:
        """The layer table (ID, qualified name, type, parameters, output shape when ``input_size``
        was given), then the modules with children that own parameters (IDs after the leaves, see
        :mod:`bbdecoder.monitor.coverage`) and a line saying how many parameter tensors and
        elements are tracked out of how many; printed and returned. ``cost=True`` adds FLOPs and
        the median forward time per layer (measured on zeros of ``input_size``, see :meth:`layer_costs`)."""
        costs = {c.id: c for c in self.layer_costs()} if cost else {}
        extra = f"  {'MFLOPs':>10} {'ms':>8}" if cost else ""
        lines = [f"{'ID':>4}  {'name':<40} {'type':<18} {'params':>10}{extra}  output shape"]
        for L in self.index:
            shape = str(self._output_shapes.get(L.id, "")) if self._output_shapes else ""
            measured = f"  {costs[L.id].flops / 1e6:>10.3f} {costs[L.id].forward_ms:>8.3f}" if cost else ""
            name = f"{L.id:>4}  {L.display_name:<40} {L.type_name:<18}"
            lines.append(f"{name} {L.num_params:>10}{measured}  {shape}")
        containers = [o for o in self.owners if not o.leaf]
        if containers:
            lines.append("modules with children that own parameters:")
            lines += [
                f"{o.id:>4}  {o.display_name:<40} {o.type_name:<18} {o.num_params:>10}" for o in containers
            ]
        lines.append(self.coverage.describe())
        table = "\n".join(lines)
        if print_table:
            print(table)
        return table
