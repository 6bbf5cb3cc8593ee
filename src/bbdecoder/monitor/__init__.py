"""The training monitor: Analyzer (alias Master_analyzer) and its probes."""

from bbdecoder.monitor.activations import channel_similarity, saturation_test
from bbdecoder.monitor.analyzer import Analyzer, EmptyEpochError, Master_analyzer, NonFiniteGradientWarning
from bbdecoder.monitor.grad_stats import GRAD_STATS, grad_statistics
from bbdecoder.monitor.graph import FunctionGraph, activation_curves, trace_graph
from bbdecoder.monitor.noise_scale import NoiseEstimate, NoiseScaleEMA
from bbdecoder.monitor.per_sample import PerSampleError, PerSampleGradients, PerSampleStats
from bbdecoder.monitor.per_sample_recorder import NOISE_STATS, PER_SAMPLE_STATS
from bbdecoder.monitor.probe_state import StatefulProbe
from bbdecoder.monitor.pruning import PrunedUnits, PruneReport

__all__ = [
    "GRAD_STATS",
    "NOISE_STATS",
    "PER_SAMPLE_STATS",
    "Analyzer",
    "EmptyEpochError",
    "FunctionGraph",
    "Master_analyzer",
    "NoiseEstimate",
    "NoiseScaleEMA",
    "NonFiniteGradientWarning",
    "PerSampleError",
    "PerSampleGradients",
    "PerSampleStats",
    "PruneReport",
    "PrunedUnits",
    "StatefulProbe",
    "activation_curves",
    "channel_similarity",
    "grad_statistics",
    "saturation_test",
    "trace_graph",
]
