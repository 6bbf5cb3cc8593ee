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
from bbdecoder.attribution.rollout import AttentionRollout, GradientRollout
from bbdecoder.bias import attention_iou, heatmap_score, mask_score
from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.inspect import LayerCost, layer_costs
from bbdecoder.integrations import (
    DatasetMaps,
    DatasetMapsError,
    DistributedAnalyzer,
    RankSync,
    explain_dataset,
    open_maps,
)
from bbdecoder.layers import LayerIndex, LayerInfo
from bbdecoder.metrics import completeness, deletion, insertion, randomisation_check
from bbdecoder.monitor import (
    Analyzer,
    EmptyEpochError,
    FunctionGraph,
    Master_analyzer,
    NonFiniteGradientWarning,
    PruneReport,
)
from bbdecoder.monitor.transformer_probes import TransformerProbes
from bbdecoder.report import build_report, store_image, store_table
from bbdecoder.store import RunReader, StoreError, open_run
from bbdecoder.store.export import export_tensorboard
from bbdecoder.targets import TargetError
from bbdecoder.viz import colorize, comparison_grid, overlay, save_figure

__version__ = "0.1.0"

__all__ = [
    "Analyzer",
    "AttentionRollout",
    "CompletenessError",
    "DatasetMaps",
    "DatasetMapsError",
    "DistributedAnalyzer",
    "EmptyEpochError",
    "Explainer",
    "FullGrad",
    "FullGradDecomposition",
    "FunctionGraph",
    "GradCAM",
    "Gradient",
    "GradientRollout",
    "HookManager",
    "InputXGradient",
    "IntegratedGradients",
    "LayerCost",
    "LayerIndex",
    "LayerInfo",
    "Master_analyzer",
    "NonFiniteGradientWarning",
    "Normalize",
    "PruneReport",
    "RankSync",
    "RunReader",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "StoreError",
    "TargetError",
    "TransformerProbes",
    "__version__",
    "attention_iou",
    "build_report",
    "colorize",
    "comparison_grid",
    "completeness",
    "deletion",
    "explain_dataset",
    "export_tensorboard",
    "heatmap_score",
    "insertion",
    "layer_costs",
    "make_baseline",
    "mask_score",
    "open_maps",
    "open_run",
    "overlay",
    "preserved_state",
    "randomisation_check",
    "save_figure",
    "store_image",
    "store_table",
]
