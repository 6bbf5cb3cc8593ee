"""The names the monitors store in a run: statistics, epoch aggregates, event kinds, blob and
histogram kinds, artifact names, and the pseudo-layers of rows that belong to no layer.

These strings are a contract (``open_run(path).scalars()`` filters by them, the report, the figures
and the alert rules look them up, stores written by earlier releases hold them): the PyTorch
:class:`~bbdecoder.monitor.Analyzer`, the Keras ``MonitorCallback``, the run-store reader, the
report and the alerts all take them from here. This module imports nothing, so any part of the
package can use it.
"""

from __future__ import annotations

# -- per-step statistics of a parameter tensor ---------------------------------------------------
GRAD_STATS: tuple[str, ...] = ("mean", "mean_abs", "max_abs", "var", "l1", "l2")
"""Gradient statistics per parameter tensor: mean, mean |g|, max |g|, population variance, L1, L2."""

MEAN_ABS = "mean_abs"
MAX_ABS = "max_abs"
"""The statistic that is non-finite exactly when the gradient holds NaN or Inf."""

L2 = "l2"
UPDATE_RATIO = "update_ratio"
"""``||W_after - W_before|| / ||W_before||`` of a step (``||dW||`` where ``||W_before|| = 0``)."""

# -- per-epoch weight statistics ---------------------------------------------------------------
WEIGHT_MEAN, WEIGHT_STD, WEIGHT_L2 = "weight_mean", "weight_std", "weight_l2"

QUANTILES: tuple[float, ...] = (0.01, 0.25, 0.5, 0.75, 0.99)
"""Weight quantiles recorded per epoch by default (stored as ``weight_q01``, ``weight_q25``, ...)."""


def quantile_name(q: float) -> str:
    """``weight_q01`` for 0.01, ``weight_q50`` for 0.5."""
    return f"weight_q{round(q * 100):02d}"


def weight_stat_names(quantiles: tuple[float, ...] = QUANTILES) -> list[str]:
    """The per-epoch weight statistics in stored order: mean, std, L2, then the quantiles."""
    return [WEIGHT_MEAN, WEIGHT_STD, WEIGHT_L2, *[quantile_name(q) for q in quantiles]]


# -- per-epoch activation statistics (param "") --------------------------------------------------
DEAD_FRACTION, DEAD_COUNT = "dead_fraction", "dead_count"
SATURATED_FRACTION, CHANNEL_VAR = "saturated_fraction", "channel_var"
ACTIVATION_STATS: tuple[str, ...] = (DEAD_FRACTION, DEAD_COUNT, SATURATED_FRACTION, CHANNEL_VAR)
ACTIVATION_PARAM = ""
"""The ``param`` of a layer's output statistics (they belong to no parameter tensor)."""

# -- per-sample statistics and the noise scale ---------------------------------------------------
PER_SAMPLE_STATS: tuple[str, ...] = ("sample_norm_mean", "sample_var", "sample_grad_sq")
"""Per parameter tensor (and for the whole model): mean_i ||g_i||, (1/B) sum_i ||g_i - G||^2, ||G||^2."""

NOISE_STATS: tuple[str, ...] = (
    "batch_size",
    "noise_trace",
    "noise_grad_sq",
    "noise_scale",
    "noise_scale_ema",
)
"""Whole model only (layer_id -1, param "*"): B, unbiased tr(Sigma) and |G|^2, B_simple, smoothed."""

RANK_NOISE_STATS: tuple[str, ...] = (
    "noise_trace_ranks",
    "noise_grad_sq_ranks",
    "noise_scale_ranks",
    "noise_scale_ranks_ema",
)
"""Whole model, under DDP (``DistributedAnalyzer(noise_scale=True)``): the two-batch noise scale."""

MICRO_NOISE_STATS: tuple[str, ...] = (
    "noise_trace_micro",
    "noise_grad_sq_micro",
    "noise_scale_micro",
    "noise_scale_micro_ema",
)
"""Whole model (``Analyzer(micro_noise_scale=True)``): the noise scale over a step's micro-batches."""

# -- transformer probes (layer_id -1, param = the block or attention module) -----------------------
TRANSFORMER_STATS: tuple[str, ...] = (
    "act_rms",
    "act_max_abs",
    "act_kurtosis",
    "attn_entropy",
    "logit_mean",
    "logit_max",
)
"""Per transformer block / attention module / the logits (``TransformerProbes``)."""

# -- rows that belong to no layer ----------------------------------------------------------------
MODEL_LAYER_ID = -1
MODEL_PARAM = "*"
"""Statistics of the whole model (per-sample totals, the noise scale)."""
USER_LAYER_ID = -1
USER_PARAM = "user"
"""Values stored by ``Analyzer.log``."""
OPTIMIZER_PARAM = "optimizer"
"""Learning rates of the attached optimizers."""

# -- epoch aggregates (column ``agg`` of ``epoch_scalars()``) ------------------------------------
AGG_MEAN, AGG_VAR, AGG_VALUE = "mean", "var", "value"

# -- events ------------------------------------------------------------------------------------
NONFINITE_GRAD = "nonfinite_grad"
"""A step's gradient held NaN/Inf; names the first layer in backward order."""
DEAD_UNITS = "dead_units"
"""Per epoch and watched layer with dead channels: ``data = {"channels": [...]}``."""
PRUNE = "prune"
"""``Analyzer.prune_dead``: what was masked, with the accuracies before and after."""
EXPLODING_GRAD = "exploding_grad"
VANISHING_GRAD = "vanishing_grad"
DEAD_UNITS_RISING = "dead_units_rising"
UPDATE_RATIO_OUT_OF_BAND = "update_ratio_out_of_band"
LOSS_SPIKE = "loss_spike"
ALERT_KINDS: tuple[str, ...] = (
    NONFINITE_GRAD,
    EXPLODING_GRAD,
    VANISHING_GRAD,
    DEAD_UNITS_RISING,
    UPDATE_RATIO_OUT_OF_BAND,
    LOSS_SPIKE,
)
"""Every event kind an alert is stored under (see :mod:`bbdecoder.alerts.rules`)."""

# -- histograms, blobs, artifacts, meta ----------------------------------------------------------
WEIGHT_HISTOGRAM = "weight"
"""The histogram kind of the per-epoch weight histograms."""
FEATURES_BLOB = "features"
"""The blob kind of a layer's stored output (``Analyzer.get_inter_features``)."""
IMAGE_BLOB, TABLE_BLOB = "image", "table"
"""Blob kinds of a figure (PNG) and a table (JSON) stored for a report section."""
TOKENS_BLOB = "token_scores"
"""The blob kind of stored token attributions ``(methods, sentences, L)`` (report section "tokens")."""
GRAPH_TEXT, GRAPH_DOT = "graph.txt", "graph.dot"
PARAMETERS_ARTIFACT = "parameters.json"
"""The model's parameter names and shapes, checked by ``resume=True``."""
META_MODEL, META_FRAMEWORK, META_COVERAGE = "model", "framework", "coverage"
META_FINISHED, META_ABORTED = "finished", "aborted"
META_EVERY = "record_every"
"""The ``every=`` of the last monitor that opened the store: its statistics (the activation probes'
too) are of one step in this many; the run summary shows it beside the steps recorded."""
META_NEXT_STEP, META_LAST_EPOCH = "next_step", "last_epoch"
"""The step count and the last epoch a monitor ran, written at each epoch end and at ``close``: with
``every > 1`` the last steps (and whole epochs) may have no ``steps`` row, and a monitor appending to
the store continues from these numbers."""
