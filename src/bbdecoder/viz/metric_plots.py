"""Figures for the evaluation metrics and bias scores (matplotlib, Agg); they never touch a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg", force=False)
import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from bbdecoder.metrics.deletion_insertion import PerturbationResult
    from bbdecoder.metrics.randomisation import RandomisationResult


def _finish(figure: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    return figure


def plot_randomisation(
    results: Mapping[str, RandomisationResult], path: str | Path | None = None, *, sample: int = 0
) -> Figure:
    """Cascading randomisation: mean Spearman (+/- 1 std over samples) per stage for each explainer,
    and one sample's maps (original, then after each stage), one row per explainer.

    Args:
        results: explainer name -> :class:`RandomisationResult` (same stages for all).
        path: where to write the PNG (parents created); ``None``: only return the figure.
    """
    if not results:
        raise ValueError("plot_randomisation needs at least one result")
    first = next(iter(results.values()))
    for name, result in results.items():
        if result.stages != first.stages:
            raise ValueError(
                f"result {name!r} randomised the stages {result.stages}, not {first.stages}; "
                "run every explainer's check with the same `layers=`"
            )
    stages = ["original", *first.stages]
    columns = len(stages)
    figure = plt.figure(figsize=(max(6.0, 1.3 * columns), 3.2 + 1.3 * len(results)))
    grid = figure.add_gridspec(1 + len(results), columns, height_ratios=[2.5] + [1.0] * len(results))
    curve = figure.add_subplot(grid[0, :])
    x = np.arange(columns)
    for name, result in results.items():
        corr = result.spearman.double()
        valid = ~torch.isnan(corr)
        mean = [1.0] + [
            float(c[v].mean()) if bool(v.any()) else float("nan") for c, v in zip(corr, valid, strict=False)
        ]
        std = [0.0] + [
            float(c[v].std(unbiased=False)) if bool(v.any()) else 0.0
            for c, v in zip(corr, valid, strict=False)
        ]
        curve.plot(x, mean, marker="o", label=name)
        curve.fill_between(x, np.subtract(mean, std), np.add(mean, std), alpha=0.2)
    curve.axhline(0.0, color="grey", linewidth=0.8)
    curve.set_xticks(x, stages, rotation=30, ha="right", fontsize=8)
    curve.set_ylabel("Spearman rank corr.\nwith original map")
    curve.set_title("Cascading randomisation, output layer first")
    curve.legend(fontsize=8)
    for row, (name, result) in enumerate(results.items(), start=1):
        maps = [result.original[sample], *(m[sample] for m in result.randomised)]
        for column, saliency in enumerate(maps):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(saliency.cpu().numpy(), cmap="magma")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, fontsize=8)
    figure.tight_layout()
    return _finish(figure, path)


def plot_perturbation_curves(
    results: Mapping[str, PerturbationResult], path: str | Path | None = None
) -> Figure:
    """Mean deletion/insertion curve per explainer with its mean AUC in the legend."""
    if not results:
        raise ValueError("plot_perturbation_curves needs at least one result")
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name, result in results.items():
        axis.plot(
            result.fractions.numpy(),
            result.curves.mean(0).numpy(),
            label=f"{name} (AUC {float(result.auc.mean()):.3f})",
        )
    first = next(iter(results.values()))
    verb = "removed" if first.mode == "deletion" else "inserted"
    axis.set_xlabel(f"fraction of pixels {verb} ({first.order.upper()}, substrate {first.substrate})")
    axis.set_ylabel("probability of the target class")
    axis.set_title(first.mode.capitalize())
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _finish(figure, path)


def plot_group_scores(
    table: pd.DataFrame, path: str | Path | None = None, *, by: str = "model", title: str | None = None
) -> Figure:
    """Bars of the mean score per group with their confidence intervals.

    Args:
        table: rows of :func:`bbdecoder.bias.group_scores` (``group, mean, ci_low, ci_high``), optionally
            with a column ``by`` (e.g. ``model``) and ``region``; one bar colour per value of
            ``by`` x ``region``.
    """
    required = {"group", "mean", "ci_low", "ci_high"}
    if not required <= set(table.columns):
        raise ValueError(f"the table needs the columns {sorted(required)}, it has {list(table.columns)}")
    table = table.copy()
    keys = [c for c in (by, "region") if c in table.columns]
    table["series"] = table[keys].astype(str).agg(" / ".join, axis=1) if keys else "score"
    groups = list(dict.fromkeys(table["group"]))
    series = list(dict.fromkeys(table["series"]))
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * max(1, len(series)) * 0.6 + 2), 3.8))
    for i, name in enumerate(series):
        rows = table[table["series"] == name].set_index("group").reindex(groups)
        positions = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        mean = rows["mean"].to_numpy(dtype=float)
        errors = np.vstack(
            [mean - rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float) - mean]
        )
        axis.bar(positions, mean, width, yerr=np.nan_to_num(errors), capsize=2, label=name)
    axis.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("Attention-IoU (mean, 95% CI)")
    if "resolution" in table.columns:
        title = (title or "Attention-IoU by group") + f" at {table['resolution'].iloc[0]}"
    axis.set_title(title or "Attention-IoU by group", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return _finish(figure, path)


def plot_bias_examples(
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
) -> Figure:
    """Rows of examples: the image with each region's outline, then each model's attention map.

    Args:
        images: (K, C, H, W) in [0, 1]; maps: name -> (K, 1, H, W) or (K, H, W); masks: region -> (K, H, W).
    """
    k = images.shape[0]
    columns = 1 + len(maps)
    figure, axes = plt.subplots(k, columns, figsize=(1.9 * columns, 1.9 * k), squeeze=False)
    colours = ["cyan", "yellow", "magenta", "white"]
    for row in range(k):
        image = images[row].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[row][0].imshow(image if image.shape[2] == 3 else image[:, :, 0], cmap="gray")
        for (region, mask), colour in zip(masks.items(), colours, strict=False):
            axes[row][0].contour(mask[row].cpu().numpy(), levels=[0.5], colors=colour, linewidths=1)
            if row == 0:
                axes[row][0].plot([], [], color=colour, label=region)
        for column, (name, batch) in enumerate(maps.items(), start=1):
            saliency = batch[row, 0] if batch.dim() == 4 else batch[row]
            axes[row][column].imshow(saliency.cpu().numpy(), cmap="magma")
            for (_, mask), colour in zip(masks.items(), colours, strict=False):
                axes[row][column].contour(
                    mask[row].cpu().numpy(), levels=[0.5], colors=colour, linewidths=0.8
                )
            if row == 0:
                axes[row][column].set_title(name, fontsize=8)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0][0].set_title("input", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    return _finish(figure, path)
