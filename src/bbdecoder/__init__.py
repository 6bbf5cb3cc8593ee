"""BBDecoder: attribution maps and a training monitor for PyTorch models.

Everything public is importable from here: ``from bbdecoder import FullGrad``.
"""

from bbdecoder.attribution import (
    CompletenessError,
    Explainer,
    FullGrad,
    FullGradDecomposition,
    GradCAM,
    Gradient,
    InputXGradient,
    IntegratedGradients,
    Normalize,
    SimpleFullGrad,
    SmoothFullGrad,
    SmoothGrad,
    make_baseline,
)
from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerIndex, LayerInfo
from bbdecoder.targets import TargetError
from bbdecoder.viz import colorize, comparison_grid, overlay, save_figure

__version__ = "0.1.0"

__all__ = [
    "CompletenessError",
    "Explainer",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "Gradient",
    "HookManager",
    "InputXGradient",
    "IntegratedGradients",
    "LayerIndex",
    "LayerInfo",
    "Normalize",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "TargetError",
    "__version__",
    "colorize",
    "comparison_grid",
    "make_baseline",
    "overlay",
    "preserved_state",
    "save_figure",
]
