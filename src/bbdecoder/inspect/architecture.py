"""The architecture picture: layer IDs drawn on the executed module/operation graph.

Graphviz's ``dot`` renders it when it is on the PATH; otherwise a layered matplotlib drawing (nodes
placed by their depth in the data flow, edges as straight arrows) that stays readable for models of
a few dozen nodes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from bbdecoder.layers import LayerIndex

if TYPE_CHECKING:  # the monitor package imports this module: no runtime import back
    from bbdecoder.monitor.graph import FunctionGraph, GraphNode

_SPACING = 1.8  # horizontal distance between nodes of one level, in units of the node height
_FILL = {"module": "#dde8f5", "op": "#f5e6d3", "input": "#e0f0e0"}


def node_label(node: GraphNode, ids: dict[str, int]) -> str:
    """``"[ID] name (Type)\\nshape"`` for module nodes; the op name and shape otherwise."""
    shape = "x".join(map(str, node.shape)) if node.shape else ""
    if node.kind == "module" and node.name in ids:
        head = f"[{ids[node.name]}] {node.name} ({node.type})"
    else:
        head = node.label
    return f"{head}\n{shape}" if shape else head


def architecture_dot(graph: FunctionGraph, index: LayerIndex) -> str:
    """Graphviz source of the graph with every module node labelled by its layer ID."""
    ids = {layer.display_name: layer.id for layer in index}
    lines = [
        "digraph architecture {",
        "  rankdir=TB;",
        '  node [shape=box, fontsize=10, style="rounded,filled"];',
    ]
    for node in graph.nodes:
        label = node_label(node, ids).replace('"', r"\"").replace("\n", r"\n")
        lines.append(f'  n{node.index} [label="{label}", fillcolor="{_FILL[node.kind]}"];')
    lines += [f"  n{a} -> n{b};" for a, b in graph.edges]
    lines.append("}")
    return "\n".join(lines)


def depths(graph: FunctionGraph) -> list[int]:
    """Longest-path depth of every node from the inputs (nodes are in execution order)."""
    depth = [0] * len(graph.nodes)
    for node in graph.nodes:
        if node.inputs:
            depth[node.index] = 1 + max(depth[i] for i in node.inputs)
    return depth


def draw_architecture(
    graph: FunctionGraph, index: LayerIndex, path: str | Path, *, engine: str = "auto"
) -> Path:
    """Write the picture to ``path`` (``.svg`` or ``.png``). ``engine``: ``"auto"`` (graphviz when
    ``dot`` is installed), ``"graphviz"`` or ``"matplotlib"``."""
    path = Path(path)
    if path.suffix not in {".svg", ".png"}:
        raise ValueError(f"the architecture picture is written as .svg or .png, got {path.name!r}")
    if engine not in {"auto", "graphviz", "matplotlib"}:
        raise ValueError(f"unknown engine {engine!r}; use 'auto', 'graphviz' or 'matplotlib'")
    path.parent.mkdir(parents=True, exist_ok=True)
    dot = shutil.which("dot")
    if engine == "graphviz" and dot is None:
        raise RuntimeError("graphviz's `dot` is not installed (apt-get install graphviz); use engine='auto'")
    if dot is not None and engine != "matplotlib":
        subprocess.run(
            [dot, f"-T{path.suffix[1:]}", "-o", str(path)],
            input=architecture_dot(graph, index).encode(),
            check=True,
            capture_output=True,
        )
        return path
    return _draw_with_matplotlib(graph, index, path)


def _draw_with_matplotlib(graph: FunctionGraph, index: LayerIndex, path: Path) -> Path:
    from matplotlib import pyplot as plt

    ids = {layer.display_name: layer.id for layer in index}
    level = depths(graph)
    rows: dict[int, list[GraphNode]] = {}
    for node in graph.nodes:
        rows.setdefault(level[node.index], []).append(node)
    width = max(len(nodes) for nodes in rows.values())
    position: dict[int, tuple[float, float]] = {}
    for depth, nodes in rows.items():
        for column, node in enumerate(nodes):
            position[node.index] = (_SPACING * (column - (len(nodes) - 1) / 2), -depth)
    figure, axis = plt.subplots(figsize=(max(5.0, 3.6 * width), max(3.0, 0.75 * len(rows) + 1)))
    for a, b in graph.edges:
        (xa, ya), (xb, yb) = position[a], position[b]
        axis.annotate(
            "", xy=(xb, yb + 0.22), xytext=(xa, ya - 0.22), arrowprops={"arrowstyle": "->", "color": "0.45"}
        )
    for node in graph.nodes:
        x, y = position[node.index]
        axis.text(
            x,
            y,
            node_label(node, ids),
            ha="center",
            va="center",
            fontsize=7,
            bbox={"boxstyle": "round", "fc": _FILL[node.kind], "ec": "0.4"},
        )
    axis.set_xlim(-_SPACING * width / 2 - 0.5, _SPACING * width / 2 + 0.5)
    axis.set_ylim(-len(rows), 0.6)
    axis.axis("off")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
