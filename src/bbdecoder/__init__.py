"""BBDecoder: attribution maps and a training monitor for PyTorch models.

Everything public is importable from here: ``from bbdecoder import FullGrad``.
"""

from bbdecoder.alerts import AlertConfig, AlertEngine, AlertWarning
from bbdecoder.attribution import (
    RISE,
    AblationCAM,
    BaseCAM,
    CompletenessError,
    EigenCAM,
    Explainer,
    FeatureAblation,
    FullGrad,
    FullGradDecomposition,
    GradCAM,
    GradCAMPlusPlus,
    Gradient,
    GradientSHAP,
    HiResCAM,
    InputXGradient,
    IntegratedGradients,
    KernelSHAP,
    LayerCAM,
    Normalize,
    Occlusion,
    ProbabilityOutputError,
    ScoreCAM,
    SimpleFullGrad,
    SmoothFullGrad,
    SmoothGrad,
    UnreachableBiasError,
    XGradCAM,
    channels_last,
    make_baseline,
    tokens,
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
    NoiseScaleEMA,
    NonFiniteGradientWarning,
    PerSampleError,
    PerSampleGradients,
    PruneReport,
)
from bbdecoder.monitor.transformer_probes import TransformerProbes
from bbdecoder.report import build_report, store_image, store_table
from bbdecoder.sinks import MLflowSink, WandbSink
from bbdecoder.store import RunReader, StoreError, open_run
from bbdecoder.store.export import export_tensorboard
from bbdecoder.targets import TargetError
from bbdecoder.viz import colorize, comparison_grid, overlay, save_figure

__version__ = "0.1.0"

__all__ = [
    "RISE",
    "AblationCAM",
    "AlertConfig",
    "AlertEngine",
    "AlertWarning",
    "Analyzer",
    "AttentionRollout",
    "BaseCAM",
    "CompletenessError",
    "DatasetMaps",
    "DatasetMapsError",
    "DistributedAnalyzer",
    "EigenCAM",
    "EmptyEpochError",
    "Explainer",
    "FeatureAblation",
    "FullGrad",
    "FullGradDecomposition",
    "FunctionGraph",
    "GradCAM",
    "GradCAMPlusPlus",
    "Gradient",
    "GradientRollout",
    "GradientSHAP",
    "HiResCAM",
    "HookManager",
    "InputXGradient",
    "IntegratedGradients",
    "KernelSHAP",
    "LayerCAM",
    "LayerCost",
    "LayerIndex",
    "LayerInfo",
    "MLflowSink",
    "Master_analyzer",
    "NoiseScaleEMA",
    "NonFiniteGradientWarning",
    "Normalize",
    "Occlusion",
    "PerSampleError",
    "PerSampleGradients",
    "ProbabilityOutputError",
    "PruneReport",
    "RankSync",
    "RunReader",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "StoreError",
    "TargetError",
    "TransformerProbes",
    "UnreachableBiasError",
    "WandbSink",
    "XGradCAM",
    "__version__",
    "attention_iou",
    "build_report",
    "channels_last",
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
    "tokens",
]
