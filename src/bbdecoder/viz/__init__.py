"""Figures and overlays (matplotlib, Agg). Figures never touch a model."""

from bbdecoder.viz.grids import comparison_grid, save_figure
from bbdecoder.viz.overlay import colorize, overlay

__all__ = ["colorize", "comparison_grid", "overlay", "save_figure"]
