"""Looking inside a model: per-layer cost and intermediate features."""

from bbdecoder.inspect.architecture import architecture_dot, draw_architecture
from bbdecoder.inspect.cost import LayerCost, cost_frame, layer_costs, plot_layer_costs
from bbdecoder.inspect.features import (
    capture_layer_output,
    feature_grid,
    small_multiples,
    write_gif,
    write_mp4,
)

__all__ = [
    "LayerCost",
    "architecture_dot",
    "capture_layer_output",
    "cost_frame",
    "draw_architecture",
    "feature_grid",
    "layer_costs",
    "plot_layer_costs",
    "small_multiples",
    "write_gif",
    "write_mp4",
]
