"""Is a saliency map faithful? Completeness, deletion/insertion (MoRF/LeRF, ROAD), randomisation check.

Every metric returns a result with per-sample numbers (``.per_sample``) and ``.summary()``.
"""

from bbdecoder.metrics.completeness import CompletenessResult, completeness
from bbdecoder.metrics.deletion_insertion import (
    PerturbationResult,
    deletion,
    insertion,
    morf_lerf,
    perturbation_curve,
)
from bbdecoder.metrics.randomisation import RandomisationResult, randomisation_check
from bbdecoder.metrics.ranks import average_ranks, spearman
from bbdecoder.metrics.substrates import noisy_linear_impute
from bbdecoder.metrics.summary import summarise

__all__ = [
    "CompletenessResult",
    "PerturbationResult",
    "RandomisationResult",
    "average_ranks",
    "completeness",
    "deletion",
    "insertion",
    "morf_lerf",
    "noisy_linear_impute",
    "perturbation_curve",
    "randomisation_check",
    "spearman",
    "summarise",
]
