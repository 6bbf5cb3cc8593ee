"""Training-monitor figures, drawn from the run store alone (never from the model).

Every function takes the run (a ``save_path`` or an open :class:`~bbdecoder.store.RunReader`) and
an output folder, saves PNG files (Agg backend) with the epoch in the file name, and returns the
paths. Axes are never clipped: limits always contain every plotted value.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bbdecoder.store.reader import RunReader, open_run
from bbdecoder.store.vocabulary import DEAD_FRACTION, GRAD_STATS, SATURATED_FRACTION

RunLike = str | Path | RunReader


def _reader(run: RunLike) -> RunReader:
    return run if isinstance(run, RunReader) else open_run(run)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "root"


def _save(fig: plt.Figure, folder: str | Path, name: str) -> Path:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def value_limits(values: np.ndarray, log: bool) -> tuple[float, float] | None:
    """Axis limits that contain every finite value (positive ones on a log axis), with a margin."""
    vals = values[np.isfinite(values)]
    if log:
        vals = vals[vals > 0]
        if vals.size == 0:
            return None
        return float(vals.min()) / 2.0, float(vals.max()) * 2.0
    if vals.size == 0:
        return None
    lo, hi = float(min(vals.min(), 0.0)), float(max(vals.max(), 0.0))
    pad = (hi - lo) * 0.05 or 1.0
    return lo - (pad if lo < 0 else 0.0), hi + pad


def _epoch_grad_means(reader: RunReader, epoch: int) -> pd.DataFrame:
    """Per-parameter epoch means of the gradient statistics (stored aggregates, else from scalars).

    Every parameter with a step in the epoch gets a row and every statistic a column; an epoch in
    which a parameter's gradient was never finite gives NaN there (drawn as a marker)."""
    sc = reader.scalars()
    sc = sc[(sc.epoch == epoch) & sc.stat.isin(_GRAD_STATS) & (sc.param != "")]
    agg = reader.epoch_scalars()
    agg = agg[(agg.epoch == epoch) & (agg.agg == "mean") & (agg.param != "")]
    if sc.empty and agg.empty:
        raise ValueError(f"the run has no gradient statistics for epoch {epoch}; epochs: {reader.epochs()}")
    from_steps = sc.groupby(["layer_id", "param", "stat"], sort=False, as_index=False)["value"].mean()
    both = pd.concat([agg[["layer_id", "param", "stat", "value"]], from_steps], ignore_index=True)
    # stored aggregates first; the step means only fill what the aggregates lack (all-NaN epochs)
    both = both.drop_duplicates(subset=["layer_id", "param", "stat"], keep="first")
    wide = both.set_index(["layer_id", "param", "stat"])["value"].unstack("stat").sort_index()
    wide = wide.reindex(columns=list(_GRAD_STATS))
    return wide.reset_index()


_GRAD_STATS = GRAD_STATS


def plot_gradient_flow(run: RunLike, folder: str | Path, epoch: int, scale: str = "log") -> Path:
    """Bar chart of each parameter's mean |g| and max |g| (epoch means), ``grad_flow_ep{epoch}.png``.

    ``scale="log"``: log y axis spanning every positive value; ``"auto"``: linear from 0.
    A parameter whose gradient was never finite in the epoch (NaN/Inf) is drawn as a red ``x`` at
    the top of the axis instead of a bar."""
    if scale not in {"log", "auto"}:
        raise ValueError(f"scale must be 'log' or 'auto', got {scale!r}")
    table = _epoch_grad_means(_reader(run), epoch)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(table)), 4))
    x = np.arange(len(table))
    max_abs = table["max_abs"].to_numpy(dtype=float)
    mean_abs = table["mean_abs"].to_numpy(dtype=float)
    finite = np.isfinite(max_abs) & np.isfinite(mean_abs)
    ax.bar(x[finite], max_abs[finite], color="c", alpha=0.5, label="max |g|")
    ax.bar(x[finite], mean_abs[finite], color="b", alpha=0.7, label="mean |g|")
    log = scale == "log"
    if log:
        ax.set_yscale("log")
    limits = value_limits(np.concatenate([max_abs, mean_abs]), log)
    if limits is None:
        limits = (1e-3, 1.0) if log else (0.0, 1.0)
    ax.set_ylim(*limits)
    if (~finite).any():
        ax.plot(
            x[~finite],
            np.full(int((~finite).sum()), limits[1]),
            "rx",
            ms=8,
            mew=2,
            clip_on=False,
            label="non-finite (NaN/Inf)",
        )
    ax.set_xticks(x, table["param"], rotation=90, fontsize=6)
    ax.set_ylabel("gradient magnitude (epoch mean)")
    ax.set_title(f"gradient flow, epoch {epoch}")
    ax.legend()
    return _save(fig, folder, f"grad_flow_ep{epoch:03d}.png")


def plot_grad_norms(run: RunLike, folder: str | Path, epoch: int) -> Path:
    """L1 and L2 gradient norms of every parameter over iterations up to ``epoch`` (log axis),
    ``grad_norms_ep{epoch}.png``."""
    reader = _reader(run)
    sc = reader.scalars()
    sc = sc[(sc.epoch <= epoch) & sc.stat.isin(["l1", "l2"])]
    if sc.empty:
        raise ValueError(f"the run has no gradient norms up to epoch {epoch}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stat in zip(axes, ["l1", "l2"], strict=True):
        part = sc[sc.stat == stat]
        for param, g in part.groupby("param", sort=False):
            ax.plot(g["step"], g["value"], lw=0.8, label=param)
        ax.set_yscale("log")
        values = part["value"].to_numpy(dtype=float)
        limits = value_limits(values, log=True) or (1e-3, 1.0)
        ax.set_ylim(*limits)
        bad = ~np.isfinite(values)
        if bad.any():  # NaN/Inf steps: a marker at the top instead of a gap in the line
            steps = np.unique(part["step"].to_numpy()[bad])
            ax.plot(steps, np.full(len(steps), limits[1]), "rx", ms=6, clip_on=False, label="non-finite")
        ax.set_xlabel("step")
        ax.set_title(f"{stat.upper()} gradient norm")
        if part["param"].nunique() <= 12:
            ax.legend(fontsize=6)
    fig.suptitle(f"gradient norms up to epoch {epoch}")
    return _save(fig, folder, f"grad_norms_ep{epoch:03d}.png")


def plot_weight_histograms(
    run: RunLike, folder: str | Path, params: list[str] | None = None, style: str = "heatmap"
) -> list[Path]:
    """Weight histograms over epochs, one figure per parameter: a heat map (epoch x bin, log
    counts) or a ridge plot. Files ``weight_hist_{param}_ep{last epoch}.png``."""
    if style not in {"heatmap", "ridge"}:
        raise ValueError(f"style must be 'heatmap' or 'ridge', got {style!r}")
    hist = _reader(run).weight_histograms()
    if hist.empty:
        raise ValueError("the run has no weight histograms yet (they are recorded at each epoch end)")
    if params is not None:
        unknown = sorted(set(params) - set(hist["param"]))
        if unknown:
            raise KeyError(f"no weight histograms for {unknown}")
        hist = hist[hist.param.isin(params)]
    paths = []
    for param, g in hist.groupby("param", sort=False):
        counts = g.pivot_table(index="epoch", columns="bin", values="count", aggfunc="last").sort_index()
        edges = np.append(g.groupby("bin")["left"].first().to_numpy(), g["right"].max())
        epochs = counts.index.to_numpy()
        last = int(epochs.max())
        fig, ax = plt.subplots(figsize=(7, 1.5 + 0.35 * len(epochs) if style == "ridge" else 4))
        data = counts.to_numpy(dtype=float)
        if style == "heatmap":
            rows = np.append(epochs - 0.5, epochs[-1] + 0.5)
            mesh = ax.pcolormesh(edges, rows, np.log1p(data), cmap="viridis")
            fig.colorbar(mesh, ax=ax, label="log(1 + count)")
            ax.set_ylabel("epoch")
        else:
            centers = (edges[:-1] + edges[1:]) / 2
            peak = max(float(data.max()), 1.0)
            for i in range(len(epochs)):
                ax.fill_between(centers, i, i + 0.9 * data[i] / peak, alpha=0.6)
            ax.set_yticks(np.arange(len(epochs)), [str(e) for e in epochs])
            ax.set_ylim(-0.1, len(epochs) + 0.1)
            ax.set_ylabel("epoch")
        ax.set_xlabel("weight value")
        ax.set_title(f"{param}: weight histogram over epochs")
        paths.append(_save(fig, folder, f"weight_hist_{_safe(str(param))}_ep{last:03d}.png"))
    return paths


def plot_activation_fractions(run: RunLike, folder: str | Path) -> Path:
    """Dead and saturated fractions of each watched layer over epochs, ``activations_ep{last}.png``."""
    sc = _reader(run).scalars()
    sc = sc[sc.stat.isin([DEAD_FRACTION, SATURATED_FRACTION])]
    if sc.empty:
        raise ValueError("the run has no activation statistics (watch_activations was not used)")
    last = int(sc["epoch"].max())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stat in zip(axes, [DEAD_FRACTION, SATURATED_FRACTION], strict=True):
        part = sc[sc.stat == stat].dropna(subset=["value"])
        for layer, g in part.groupby("layer", sort=False):
            ax.plot(g["epoch"], g["value"], marker="o", label=layer)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch")
        ax.set_title(stat.replace("_", " "))
        if part["layer"].nunique() <= 12 and not part.empty:
            ax.legend(fontsize=6)
    return _save(fig, folder, f"activations_ep{last:03d}.png")


def plot_activation_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], folder: str | Path) -> Path:
    """Each activation function's curve (from :func:`bbdecoder.monitor.activation_curves`),
    ``activation_curves.png``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name)
    ax.axhline(0, color="0.7", lw=0.5)
    ax.axvline(0, color="0.7", lw=0.5)
    ax.set_xlabel("input")
    ax.set_ylabel("output")
    if curves:
        ax.legend(fontsize=7)
    ax.set_title("activation functions")
    return _save(fig, folder, "activation_curves.png")
