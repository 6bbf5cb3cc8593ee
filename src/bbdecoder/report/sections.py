"""The report's sections. Each is a function ``(ReportContext) -> Section | None``: ``None`` when the
run holds no data for it, so a run without saliency or bias data still gives a report.

To add a section, write such a function and append it to :data:`SECTIONS` (or pass your own list
to :func:`bbdecoder.report.build_report`). Sections read the run store only, never a model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from bbdecoder.report import html
from bbdecoder.report.blobs import IMAGE_KIND, TABLE_KIND, latest_records, read_table
from bbdecoder.report.html import Section
from bbdecoder.store.reader import RunReader

MAX_WEIGHT_HISTOGRAMS = 24


class ReportContext:
    """What sections share: the open ``reader``, a scratch folder for figures, cached tables."""

    def __init__(self, reader: RunReader, scratch: Path, claimed: set[str] | None = None) -> None:
        self.reader = reader
        self.scratch = scratch
        self.claimed: set[str] = claimed if claimed is not None else {"summary"}
        """Blob sections that some section shows (the rest go to "Other results")."""

    @functools.cached_property
    def scalars(self) -> pd.DataFrame:
        return self.reader.scalars()

    @functools.cached_property
    def steps(self) -> pd.DataFrame:
        return self.reader.steps()

    @functools.cached_property
    def layers(self) -> pd.DataFrame:
        return self.reader.layers()

    @functools.cached_property
    def events(self) -> pd.DataFrame:
        return self.reader.events()

    def grad_epochs(self) -> list[int]:
        """Epochs that hold per-step gradient statistics, ascending."""
        grads = self.scalars[self.scalars["stat"] == "mean_abs"]
        return sorted(int(e) for e in grads["epoch"].unique())

    def png(self, path: Path) -> bytes:
        return Path(path).read_bytes()


SectionBuilder = Callable[[ReportContext], "Section | None"]


def run_summary(ctx: ReportContext) -> Section | None:
    meta = ctx.reader.meta()
    coverage = meta.pop("coverage", None)
    rows: list[tuple[str, object]] = [(key, value) for key, value in sorted(meta.items())]
    layers = ctx.layers
    if not layers.empty:
        rows += [("layers", len(layers)), ("parameters", int(layers["params"].sum()))]
    steps = ctx.steps
    if not steps.empty:
        rows += [
            ("steps recorded", len(steps)),
            ("epochs", int(steps["epoch"].nunique())),
            ("wall time of recorded steps (s)", float(steps["time"].max() - steps["time"].min())),
        ]
        losses = steps["loss"].dropna()
        if not losses.empty:
            rows += [("first loss", float(losses.iloc[0])), ("last loss", float(losses.iloc[-1]))]
    tracked = ctx.scalars["param"].replace("", np.nan).dropna().nunique() if not ctx.scalars.empty else 0
    rows.append(("parameter tensors tracked", _coverage_text(coverage, int(tracked))))
    body = html.table(pd.DataFrame(rows, columns=["item", "value"]).astype({"value": object}))
    for record in latest_records(ctx.reader, TABLE_KIND, "summary").itertuples():
        body += html.table(read_table(ctx.reader, record.blob_id), caption=record.caption)
    if not steps.empty and steps["loss"].notna().any():
        body += html.image(_loss_figure(steps, ctx.scratch), "training loss", "training loss per step")
    return Section("summary", "Run summary", body)


def _coverage_text(coverage: str | None, tracked: int) -> str:
    """"12 of 12 trainable tensors (3,412 of 3,412 elements)" from the store's coverage record."""
    import json

    try:
        c = json.loads(coverage or "")
        return (
            f"{c['tracked_tensors']} of {c['trainable_tensors']} trainable tensors "
            f"({c['tracked_elements']:,} of {c['trainable_elements']:,} elements; "
            f"{c['total_tensors']} tensors in the model)"
        )
    except (ValueError, KeyError, TypeError):
        return str(tracked)  # a store written before coverage was recorded


def _loss_figure(steps: pd.DataFrame, scratch: Path) -> bytes:
    from matplotlib import pyplot as plt

    from bbdecoder.report.blobs import figure_png

    figure, axis = plt.subplots(figsize=(6.5, 3))
    valid = steps.dropna(subset=["loss"])
    axis.plot(valid["step"], valid["loss"], lw=1)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("training loss")
    return figure_png(figure)


def layer_table(ctx: ReportContext) -> Section | None:
    layers = ctx.layers
    if layers.empty:
        return None
    frame = layers.rename(columns={"layer_id": "ID", "output_shape": "output shape"}).fillna("")
    return Section("layers", "Layers", html.table(frame, max_rows=1000))


def gradient_flow(ctx: ReportContext) -> Section | None:
    from bbdecoder.viz.monitor_plots import plot_gradient_flow

    epochs = ctx.grad_epochs()
    if not epochs:
        return None
    shown = sorted({epochs[0], epochs[-1]})
    body = html.paragraph(
        "Mean and max |gradient| of every tracked parameter tensor, averaged over the epoch's steps "
        "(log axis). Vanishing gradients show as bars orders of magnitude below the others."
    )
    for epoch in shown:
        path = plot_gradient_flow(ctx.reader, ctx.scratch, epoch)
        body += html.image(ctx.png(path), f"gradient flow, epoch {epoch}", f"epoch {epoch}")
    return Section("gradient-flow", "Gradient flow", body)


def gradient_norms(ctx: ReportContext) -> Section | None:
    from bbdecoder.viz.monitor_plots import plot_grad_norms

    epochs = ctx.grad_epochs()
    if not epochs:
        return None
    path = plot_grad_norms(ctx.reader, ctx.scratch, epochs[-1])
    body = html.paragraph("L1 and L2 norms of each parameter's gradient at every recorded step.")
    body += html.image(ctx.png(path), "gradient norms over iterations", f"steps up to epoch {epochs[-1]}")
    ratios = ctx.scalars[ctx.scalars["stat"] == "update_ratio"].dropna(subset=["value"])
    if not ratios.empty:
        summary = (
            ratios.groupby("param", sort=False)["value"]
            .agg(["median", "min", "max"])
            .reset_index()
            .rename(columns={"median": "median update ratio", "min": "min", "max": "max"})
        )
        body += html.table(summary, caption="update ratio ||dW|| / ||W|| per step")
    return Section("gradient-norms", "Gradient norms over iterations", body)


def weight_histograms(ctx: ReportContext) -> Section | None:
    from bbdecoder.report.figures import weight_histogram_grid

    hist = ctx.reader.histograms(kind="weight")
    if hist.empty:
        return None
    params = list(dict.fromkeys(hist["param"]))
    shown = params[:MAX_WEIGHT_HISTOGRAMS]
    body = html.paragraph(
        "Each parameter's weight histogram on fixed bins at the end of every epoch (rows: epochs; colour: "
        "log(1 + count)). A histogram that stops changing, collapses to zero or spreads without bound "
        "shows here."
        + (f" First {len(shown)} of {len(params)} parameters shown." if len(shown) < len(params) else "")
    )
    png = weight_histogram_grid(hist, shown)
    body += html.image(png, "weight histograms over epochs", "one panel per parameter tensor")
    return Section("weights", "Weight histograms over time", body)


def activations(ctx: ReportContext) -> Section | None:
    from bbdecoder.viz.monitor_plots import plot_activation_fractions

    stats = ctx.scalars[ctx.scalars["stat"].isin(["dead_fraction", "dead_count", "saturated_fraction"])]
    if stats.empty:
        return None
    path = plot_activation_fractions(ctx.reader, ctx.scratch)
    last = stats[stats["epoch"] == stats["epoch"].max()]
    table = last.pivot_table(index=["layer_id", "layer"], columns="stat", values="value").reset_index()
    body = html.paragraph(
        "A unit (channel) is dead when its output was at or below the threshold for every sample and "
        "position of the epoch; saturated means stuck at an activation's bound."
    )
    body += html.image(ctx.png(path), "dead and saturated fractions", "per watched layer, over epochs")
    body += html.table(table, caption=f"epoch {int(last['epoch'].max())}")
    return Section("activations", "Dead and saturated units", body)


def nonfinite_events(ctx: ReportContext) -> Section | None:
    if ctx.steps.empty and ctx.events.empty:
        return None
    events = ctx.events
    bad = events[events["kind"] == "nonfinite_grad"]
    if bad.empty:
        body = html.paragraph("No non-finite (NaN or Inf) gradient was recorded.")
    else:
        body = html.paragraph(
            f"{len(bad)} step(s) had a non-finite gradient; the layer named is the first in backward order."
        )
        body += html.table(bad[["step", "epoch", "layer", "param", "message"]])
    others = events[events["kind"] != "nonfinite_grad"]
    if not others.empty:
        body += html.table(others[["step", "epoch", "kind", "layer", "message"]], caption="other events")
    return Section("nonfinite", "Non-finite gradients and events", body)


def function_graph(ctx: ReportContext) -> Section | None:
    try:
        text = ctx.reader.artifact("graph.txt")
    except KeyError:
        return None
    return Section("graph", "Function graph", f"<pre>{html.esc(text)}</pre>")


class BlobSection:
    """A section that shows the images and tables stored for report section ``key``
    (see :func:`bbdecoder.report.store_image` and :func:`bbdecoder.report.store_table`)."""

    def __init__(self, key: str, title: str, intro: str = "") -> None:
        self.key, self.title, self.intro = key, title, intro
        self.__name__ = f"blob_section_{key}"

    def __call__(self, ctx: ReportContext) -> Section | None:
        images = latest_records(ctx.reader, IMAGE_KIND, self.key)
        tables = latest_records(ctx.reader, TABLE_KIND, self.key)
        if images.empty and tables.empty:
            return None
        body = html.paragraph(self.intro) if self.intro else ""
        for record in tables.itertuples():
            body += html.table(read_table(ctx.reader, record.blob_id), caption=record.caption or record.name)
        for record in images.itertuples():
            body += html.image(ctx.reader.blob(record.blob_id), record.name, record.caption or record.name)
        return Section(self.key, self.title, body)


def blob_section(key: str, title: str, intro: str = "") -> BlobSection:
    """A section for the images and tables stored with ``section=key``."""
    return BlobSection(key, title, intro)


def other_results(ctx: ReportContext) -> Section | None:
    """Images and tables stored for sections that no section of this report shows."""
    body = ""
    for kind in (TABLE_KIND, IMAGE_KIND):
        records = latest_records(ctx.reader, kind)
        records = records[~records["section"].isin(ctx.claimed)] if not records.empty else records
        for record in records.itertuples():
            caption = f"[{record.section}] {record.caption or record.name}"
            if kind == TABLE_KIND:
                body += html.table(read_table(ctx.reader, record.blob_id), caption=caption)
            else:
                body += html.image(ctx.reader.blob(record.blob_id), record.name, caption)
    return Section("other", "Other results", body) if body else None


SECTIONS: list[SectionBuilder] = [
    run_summary,
    layer_table,
    gradient_flow,
    gradient_norms,
    weight_histograms,
    activations,
    nonfinite_events,
    blob_section(
        "saliency",
        "Saliency maps",
        "Attribution maps of several methods for a handful of test images (overlaid on the input).",
    ),
    blob_section("metrics", "Evaluation metrics"),
    blob_section(
        "bias",
        "Bias: Attention-IoU on the planted-bias set",
        "Attention-IoU (Serianni et al., CVPR 2025) between Grad-CAM maps and the masks of the true "
        "feature and of the spurious patch: 1 = the attention matches the region, 0 = disjoint.",
    ),
    blob_section(
        "cost", "Per-layer cost", "Parameters, FLOPs (multiply-add = 2), output bytes, median forward time."
    ),
    blob_section(
        "features",
        "Features over training",
        "A layer's output channels for one probe input, recorded once per epoch, all on one colour scale.",
    ),
    blob_section("architecture", "Architecture", "The executed graph; module nodes carry their layer IDs."),
    function_graph,
    other_results,
]
"""The report's sections, in page order."""
