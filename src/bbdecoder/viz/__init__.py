"""Figures and overlays (matplotlib, Agg). Figures never touch a model."""

from bbdecoder.viz.grids import comparison_grid, save_figure
from bbdecoder.viz.overlay import colorize, overlay
from bbdecoder.viz.tokens import merge_subwords, token_figure, tokens_html

__all__ = [
    "colorize",
    "comparison_grid",
    "merge_subwords",
    "overlay",
    "save_figure",
    "token_figure",
    "tokens_html",
]
