"""Measuring bias with Attention-IoU (Serianni et al., CVPR 2025).

``attention_iou(a, b)`` is the bare score of two batches of non-negative maps; ``mask_score`` and
``heatmap_score`` min-max scale attention maps, pick the comparison resolution and return
:class:`BiasScores`, which groups scores with bootstrap confidence intervals.
"""

from bbdecoder.bias.bootstrap import Interval, bootstrap_ci
from bbdecoder.bias.groups import across_seeds, group_scores
from bbdecoder.bias.maps import attention_maps
from bbdecoder.bias.report import format_table
from bbdecoder.bias.score import attention_iou, minmax_scale
from bbdecoder.bias.scores import BiasScores, heatmap_score, mask_score

__all__ = [
    "BiasScores",
    "Interval",
    "across_seeds",
    "attention_iou",
    "attention_maps",
    "bootstrap_ci",
    "format_table",
    "group_scores",
    "heatmap_score",
    "mask_score",
    "minmax_scale",
]
