"""Figures of the per-sample statistics, drawn from the run store alone.

- :func:`plot_gradient_snr`: per parameter tensor, the gradient signal-to-noise ratio over training,
  ``SNR = ||G_B||^2 / (tr(Sigma) / B)`` with ``tr(Sigma) = B / (B - 1) * sample_var``: the batch
  gradient's squared norm over the expected squared norm of its noise (about 1 when the batch
  gradient is noise only, large when the samples agree).
- :func:`plot_noise_scale`: ``B_simple`` per step and smoothed (per-sample and, under DDP, the
  ranks' or the micro-batches' two-batch estimate) against the batch size in use.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bbdecoder.viz.monitor_plots import RunLike, _reader, _save, value_limits


def gradient_snr(run: RunLike) -> pd.DataFrame:
    """Columns ``step, param, snr`` (one row per parameter tensor and per-sample step; ``param``
    ``"*"`` for the whole model)."""
    frame = _reader(run).scalars()
    wanted = frame[frame.stat.isin(["sample_var", "sample_grad_sq"])]
    if wanted.empty:
        raise ValueError("the run has no per-sample statistics: record with Analyzer(..., per_sample=True)")
    table = wanted.pivot_table(index=["step", "param"], columns="stat", values="value").reset_index()
    batch = frame[(frame.stat == "batch_size") & (frame.param == "*")].set_index("step").value
    b = table.step.map(batch).to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        trace = b / (b - 1) * table.sample_var.to_numpy()
        table["snr"] = table.sample_grad_sq.to_numpy() / (trace / b)
    return table[["step", "param", "snr"]]


def plot_gradient_snr(run: RunLike, folder: str | Path, max_lines: int = 12) -> Path:
    """Per-tensor gradient SNR over the per-sample steps (log scale); ``gradient_snr.png``.
    With more than ``max_lines`` tensors, those with the largest gradient share are drawn."""
    snr = gradient_snr(run)
    frame = _reader(run).scalars("sample_grad_sq")
    share = frame[frame.param != "*"].groupby("param").value.mean().sort_values(ascending=False)
    params = ["*", *list(share.index[:max_lines])]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for param in params:
        part = snr[snr.param == param].sort_values("step")
        style = {"color": "black", "linewidth": 2.0} if param == "*" else {"linewidth": 1.0}
        ax.plot(part.step, part.snr, marker=".", label="whole model" if param == "*" else param, **style)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    limits = value_limits(snr[snr.param.isin(params)].snr.to_numpy(dtype=float), log=True)
    if limits is not None:
        ax.set_ylim(min(limits[0], 0.5), max(limits[1], 2.0))
    ax.set_xlabel("step")
    ax.set_ylabel("||G_B||² / (tr Σ / B)")
    ax.set_title("gradient signal-to-noise per tensor (1: noise only)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder, "gradient_snr.png")


def plot_noise_scale(run: RunLike, folder: str | Path) -> Path:
    """``B_simple`` over training against the batch size in use; ``noise_scale.png``."""
    frame = _reader(run).scalars()
    model = frame[frame.param == "*"]
    series = {
        "noise_scale": ("B_simple (per-sample, this step)", {"linestyle": "none", "marker": "."}),
        "noise_scale_ema": ("B_simple (per-sample, smoothed)", {"linewidth": 2.0}),
        "noise_scale_ranks": ("B_simple (ranks, this step)", {"linestyle": "none", "marker": "x"}),
        "noise_scale_ranks_ema": ("B_simple (ranks, smoothed)", {"linewidth": 2.0, "linestyle": "--"}),
        "noise_scale_micro": ("B_simple (micro-batches, this step)", {"linestyle": "none", "marker": "+"}),
        "noise_scale_micro_ema": ("B_simple (micro-batches, smoothed)", {"linewidth": 2.0, "linestyle": ":"}),
        "batch_size": ("batch size in use", {"color": "black", "drawstyle": "steps-post"}),
    }
    present = [s for s in series if (model.stat == s).any()]
    if not any(s.startswith("noise_scale") for s in present):
        raise ValueError(
            "the run has no noise scale: record with Analyzer(..., per_sample=True), "
            "Analyzer(..., micro_noise_scale=True) or DistributedAnalyzer(..., noise_scale=True)"
        )
    fig, ax = plt.subplots(figsize=(8, 4.5))
    values = []
    for stat in present:
        part = model[model.stat == stat].sort_values("step")
        label, style = series[stat]
        ax.plot(part.step, part.value, label=label, **style)  # type: ignore[arg-type]
        values.append(part.value.to_numpy(dtype=float))
    ax.set_yscale("log")
    limits = value_limits(np.concatenate(values), log=True)
    if limits is not None:
        ax.set_ylim(*limits)
    ax.set_xlabel("step")
    ax.set_ylabel("samples")
    ax.set_title("gradient noise scale B_simple = tr Σ / |G|² (negative estimates not drawn)")
    ax.legend(fontsize=8)
    return _save(fig, folder, "noise_scale.png")


__all__ = ["gradient_snr", "plot_gradient_snr", "plot_noise_scale"]
