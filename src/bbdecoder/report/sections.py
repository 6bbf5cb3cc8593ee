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

from bbdecoder.report import charts, html
from bbdecoder.report.blobs import IMAGE_KIND, TABLE_KIND, latest_records, read_table
from bbdecoder.report.html import Section
from bbdecoder.report.section_noise import gradient_noise
from bbdecoder.report.section_probes import transformer_probes
from bbdecoder.report.section_tokens import token_maps
from bbdecoder.store.reader import RunReader

MAX_WEIGHT_HISTOGRAMS = 24


class ReportContext:
    """What sections share: the open ``reader``, a scratch folder for figures, cached tables, and
    the interactive chart specs collected for the page (:meth:`chart`)."""

    def __init__(
        self,
        reader: RunReader,
        scratch: Path,
        claimed: set[str] | None = None,
        max_points: int = charts.MAX_POINTS,
    ) -> None:
        self.reader = reader
        self.scratch = scratch
        self.claimed: set[str] = claimed if claimed is not None else {"summary"}
        """Blob sections that some section shows (the rest go to "Other results")."""
        self.max_points = max_points
        """Largest number of x positions per chart (longer series are downsampled, extremes kept)."""
        self.charts: list[dict[str, object]] = []

    def chart(self, spec: dict[str, object]) -> str:
        """Add an interactive chart spec (see :mod:`bbdecoder.report.charts`) to the page; returns
        the HTML placeholder it is drawn into."""
        self.charts.append(spec)
        return html.chart(str(spec["id"]))

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
        rows = charts._rows(
            self.reader,
            "SELECT DISTINCT s.epoch FROM scalars s JOIN stat_names n USING (stat_id) "
            "WHERE n.name = 'mean_abs' ORDER BY s.epoch",
        )
        return [int(r[0]) for r in rows]

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
    tracked = charts._rows(
        ctx.reader,
        "SELECT COUNT(DISTINCT r.param) FROM series r WHERE r.param != '' AND "
        "EXISTS (SELECT 1 FROM scalars s WHERE s.series_id = r.series_id LIMIT 1)",
    )[0][0]
    rows.append(("parameter tensors tracked", _coverage_text(coverage, int(tracked))))
    body = html.table(pd.DataFrame(rows, columns=["item", "value"]).astype({"value": object}))
    for record in latest_records(ctx.reader, TABLE_KIND, "summary").itertuples():
        body += html.table(read_table(ctx.reader, record.blob_id), caption=record.caption)
    if not steps.empty and steps["loss"].notna().any():
        body += ctx.chart(_loss_chart(steps, ctx.max_points))
    return Section("summary", "Run summary", body)


def _coverage_text(coverage: str | None, tracked: int) -> str:
    """ "12 of 12 trainable tensors (3,412 of 3,412 elements)" from the store's coverage record."""
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


def _loss_chart(steps: pd.DataFrame, max_points: int) -> dict[str, object]:
    matrix = charts.StatMatrix(
        steps["step"].to_numpy(dtype=np.int64),
        steps["loss"].to_numpy(dtype=float).reshape(-1, 1),
        [{"layer_id": -1, "layer": "", "param": ""}],
        int((~np.isfinite(steps["loss"].to_numpy(dtype=float))).sum() - steps["loss"].isna().sum()),
    )
    return charts.line_chart(
        "loss", "training loss per step", matrix, "loss", labels=["loss"], max_points=max_points
    )


def user_values(ctx: ReportContext) -> Section | None:
    """The values given to ``Analyzer.log`` and the optimizers' learning rates (layer_id -1)."""
    scalars = ctx.scalars
    mine = scalars[(scalars["layer_id"] == -1) & scalars["param"].isin(["user", "optimizer"])]
    epochs = ctx.reader.epoch_scalars()
    per_epoch = epochs[(epochs["layer_id"] == -1) & (epochs["param"] == "user")]
    if mine.empty and per_epoch.empty:
        return None
    body = html.paragraph(
        "Values stored with analyzer.log(name=value) per step, the learning rate of every parameter group "
        "of the attached optimizers (recorded at each recorded step), and per-epoch values "
        "(analyzer.log(epoch=..., name=value))."
    )
    for (param, stat), rows in mine.groupby(["param", "stat"], sort=True):
        rows = rows.sort_values("step")
        matrix = charts.StatMatrix(
            rows["step"].to_numpy(dtype=np.int64),
            rows["value"].to_numpy(dtype=float).reshape(-1, 1),
            [{"layer_id": -1, "layer": "", "param": str(param)}],
            int((~np.isfinite(rows["value"].to_numpy(dtype=float))).sum()),
        )
        body += ctx.chart(
            charts.line_chart(
                f"user-{param}-{stat}",
                f"{stat} per step",
                matrix,
                str(stat),
                labels=[str(stat)],
                max_points=ctx.max_points,
            )
        )
    if not per_epoch.empty:
        table = per_epoch.pivot_table(index="epoch", columns="stat", values="value", aggfunc="last")
        body += html.table(table.reset_index(), caption="values per epoch")
    return Section("user-values", "Logged values and learning rates", body)


def layer_table(ctx: ReportContext) -> Section | None:
    layers = ctx.layers
    if layers.empty:
        return None
    layers = layers.copy()
    missing = layers["output_shape"].isna() | (layers["output_shape"] == "")
    if missing.any():  # a layer's recorded features (get_inter_features) know its output shape
        features = ctx.reader.blobs(kind="features")
        for record in features.itertuples():
            shape = record.meta.get("shape")
            hit = missing & (layers["layer_id"] == record.layer_id)
            if shape and hit.any():
                layers.loc[hit, "output_shape"] = str(list(shape))
                missing &= ~hit
    frame = layers.rename(columns={"layer_id": "ID", "output_shape": "output shape"}).fillna("")
    body = html.table(frame, max_rows=1000)
    if missing.any():
        body += html.paragraph(
            f"{int(missing.sum())} layer(s) without an output shape: the run recorded none for them. Pass "
            "input_size=(1, C, H, W) to Analyzer to record them."
        )
    return Section("layers", "Layers", body)


def _flow(ctx: ReportContext, epoch: int) -> tuple[list[dict[str, object]], dict[str, np.ndarray]]:
    """Per parameter tensor, the epoch's mean over steps of mean |g| and of max |g| (NaN skipped)."""
    rows = charts._rows(
        ctx.reader,
        "SELECT r.layer_id, l.name, r.param, n.name, AVG(s.value) FROM scalars s "
        "JOIN series r USING (series_id) JOIN stat_names n USING (stat_id) "
        "LEFT JOIN layers l ON l.layer_id = r.layer_id "
        "WHERE s.epoch = ? AND r.param != '' AND n.name IN ('mean_abs', 'max_abs') "
        "GROUP BY r.series_id, n.name ORDER BY r.layer_id, r.series_id",
        (epoch,),
    )
    keys: dict[tuple[int, str], dict[str, object]] = {}
    values: dict[str, dict[tuple[int, str], float]] = {"max |g|": {}, "mean |g|": {}}
    for layer_id, layer, param, stat, value in rows:
        key = (int(layer_id), str(param))
        keys.setdefault(key, {"layer_id": int(layer_id), "layer": str(layer or ""), "param": str(param)})
        label = "mean |g|" if stat == "mean_abs" else "max |g|"
        values[label][key] = float("nan") if value is None else float(value)
    bars = {label: np.array([v.get(k, np.nan) for k in keys]) for label, v in values.items()}
    return list(keys.values()), bars


def gradient_flow(ctx: ReportContext) -> Section | None:
    epochs = ctx.grad_epochs()
    if not epochs:
        return None
    shown = sorted({epochs[0], epochs[-1]})
    body = html.paragraph(
        "Mean and max |gradient| of every tracked parameter tensor, averaged over the epoch's steps "
        "(log axis by default). Vanishing gradients show as bars orders of magnitude below the others. "
        "Benign exception: the bias of a layer followed by BatchNorm (and a transformer's attention key "
        "bias) has a zero gradient by construction, since the next operation removes any constant "
        "shift; its bar sits at rounding level while its weight's bar is normal, and no alert is raised "
        "for it. Hover a bar for its layer and parameter; drag to zoom, double-click to reset."
    )
    for epoch in shown:
        categories, bars = _flow(ctx, epoch)
        body += ctx.chart(
            charts.bar_chart(
                f"gradient-flow-{epoch}",
                f"gradient flow, epoch {epoch}",
                categories,
                bars,
                ylabel="gradient magnitude (epoch mean)",
            )
        )
    return Section("gradient-flow", "Gradient flow", body)


def gradient_norms(ctx: ReportContext) -> Section | None:
    epochs = ctx.grad_epochs()
    if not epochs:
        return None
    body = html.paragraph(
        "L2 and L1 norms of each parameter's gradient at every recorded step. Hover a line for its layer, "
        "parameter, step and value; click a legend entry to hide or show it; type in the filter to keep "
        "the layers whose name matches."
    )
    for stat, title in (("l2", "L2 gradient norm"), ("l1", "L1 gradient norm")):
        matrix = charts.stat_matrix(ctx.reader, stat, params_only=True)
        if matrix is not None:
            body += ctx.chart(
                charts.line_chart(
                    f"grad-{stat}", f"{title} per step", matrix, stat, log=True, max_points=ctx.max_points
                )
            )
    ratios = charts.stat_matrix(ctx.reader, "update_ratio", params_only=True)
    if ratios is not None:
        infinite = charts._rows(
            ctx.reader,
            "SELECT COUNT(*) FROM scalars s JOIN stat_names n USING (stat_id) "
            "WHERE n.name = 'update_ratio' AND s.value > 1e308",
        )[0][0]
        note = (
            f"{infinite} update ratio(s) were infinite (the weight was exactly zero, e.g. a zero-initialised "
            "bias, so ||dW|| / ||W|| is undefined); they are left out here and in the table."
            if infinite
            else ""
        )
        body += ctx.chart(
            charts.line_chart(
                "update-ratio",
                "update ratio ||dW|| / ||W|| per step",
                ratios,
                "update_ratio",
                log=True,
                note=note,
                max_points=ctx.max_points,
            )
        )
        body += html.table(_ratio_summary(ctx), caption="update ratio ||dW|| / ||W|| per step")
    return Section("gradient-norms", "Gradient norms over iterations", body)


def _ratio_summary(ctx: ReportContext) -> pd.DataFrame:
    """Median, min and max of the finite update ratios per parameter; NaN where none was finite."""
    rows = charts._rows(
        ctx.reader,
        "SELECT r.param, s.value FROM scalars s JOIN series r USING (series_id) "
        "JOIN stat_names n USING (stat_id) WHERE n.name = 'update_ratio' AND r.param != '' "
        "ORDER BY r.series_id",
    )
    frame = pd.DataFrame(rows, columns=["param", "value"]).astype({"value": float})
    frame.loc[~np.isfinite(frame["value"]), "value"] = np.nan
    summary = frame.groupby("param", sort=False)["value"].agg(["median", "min", "max"]).reset_index()
    return summary.rename(columns={"median": "median update ratio"})


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
    names = "('dead_fraction', 'dead_count', 'saturated_fraction')"
    rows = charts._rows(
        ctx.reader,
        "SELECT s.epoch, r.layer_id, COALESCE(l.name, ''), n.name, s.value FROM scalars s "
        "JOIN series r USING (series_id) JOIN stat_names n USING (stat_id) "
        f"LEFT JOIN layers l ON l.layer_id = r.layer_id WHERE n.name IN {names} AND s.epoch = "
        f"(SELECT MAX(s2.epoch) FROM scalars s2 JOIN stat_names n2 USING (stat_id) WHERE n2.name IN {names})",
    )
    if not rows:
        return None
    last = pd.DataFrame(rows, columns=["epoch", "layer_id", "layer", "stat", "value"]).astype(
        {"value": float}
    )
    table = last.pivot_table(index=["layer_id", "layer"], columns="stat", values="value").reset_index()
    body = html.paragraph(
        "A unit (channel) is dead when its output was at or below the threshold for every sample and "
        "position of the epoch; saturated means stuck at an activation's bound. For ReLU the lower "
        "bound is 0, so its saturated fraction is the share of outputs that are exactly zero: around "
        "half is normal for a ReLU and benign; dead units (zero for every input) are what to watch. "
        "For sigmoid and tanh, a high saturated fraction means vanishing gradients through that layer."
    )
    for stat in ("dead_fraction", "saturated_fraction"):
        matrix = charts.stat_matrix(ctx.reader, stat, params_only=False, by="epoch")
        if matrix is not None:
            title = stat.replace("_", " ") + " per watched layer, over epochs"
            body += ctx.chart(
                charts.line_chart(
                    f"act-{stat}",
                    title,
                    matrix,
                    stat,
                    xlabel="epoch",
                    max_points=ctx.max_points,
                    yrange=(0, 1),
                )
            )
    body += html.table(table, caption=f"epoch {int(last['epoch'].max())}")
    return Section("activations", "Dead and saturated units", body)


def alert_rows(events: pd.DataFrame) -> list[dict[str, object]]:
    """The stored alerts (events of the kinds in :data:`bbdecoder.alerts.ALERT_KINDS`) as JSON rows."""
    from bbdecoder.alerts.rules import ALERT_KINDS

    if events.empty:
        return []
    chosen = events[events["kind"].isin(ALERT_KINDS)]
    return [
        {
            "step": None if pd.isna(r.step) else int(r.step),
            "epoch": None if pd.isna(r.epoch) else int(r.epoch),
            "kind": str(r.kind),
            "layer": "" if r.layer is None or pd.isna(r.layer) else str(r.layer),
            "param": "" if r.param is None or pd.isna(r.param) else str(r.param),
            "message": str(r.message),
        }
        for r in chosen.itertuples()
    ]


def alerts(ctx: ReportContext) -> Section | None:
    """The alerts stored in the run (see :mod:`bbdecoder.alerts`); the dashboard updates the table."""
    if ctx.steps.empty and ctx.events.empty:
        return None
    rows = alert_rows(ctx.events)
    if rows:
        frame = pd.DataFrame(rows)[["step", "kind", "layer", "param", "message"]]
        inner = html.table(frame.rename(columns={"kind": "alert", "param": "parameter"}), max_rows=500)
    else:
        inner = html.paragraph("No alert was raised.")
    intro = html.paragraph(
        "Training anomalies detected as steps were recorded: non-finite or exploding gradients, vanishing "
        "gradients, rising dead-unit fractions, update ratios outside a healthy band, loss spikes "
        "(rules and thresholds: bbdecoder.alerts)."
    )
    return Section("alerts", "Alerts", f'{intro}<div id="bbd-alerts">{inner}</div>')


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
    from bbdecoder.alerts.rules import ALERT_KINDS

    others = events[~events["kind"].isin(ALERT_KINDS)]
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
    user_values,
    layer_table,
    gradient_flow,
    gradient_norms,
    gradient_noise,
    weight_histograms,
    activations,
    transformer_probes,
    alerts,
    nonfinite_events,
    blob_section(
        "saliency",
        "Saliency maps",
        "Attribution maps of several methods for a handful of test images (overlaid on the input).",
    ),
    token_maps,
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
