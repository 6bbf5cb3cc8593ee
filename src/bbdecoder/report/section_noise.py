"""The report section "Gradient noise scale": ``B_simple`` over training against the batch size in
use, the per-tensor gradient signal-to-noise ratio, and the last per-sample step's table. Drawn from
the store's per-sample rows (``Analyzer(per_sample=)``) and the ranks' two-batch estimate
(``DistributedAnalyzer(noise_scale=True)``) or the micro-batches of accumulated steps
(``Analyzer(micro_noise_scale=True)``); absent when the run has none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bbdecoder.report import charts, html
from bbdecoder.report.html import Section

if TYPE_CHECKING:
    from bbdecoder.report.sections import ReportContext

NOISE_SERIES: dict[str, str] = {
    "noise_scale": "B_simple, per-sample (this step)",
    "noise_scale_ema": "B_simple, per-sample (smoothed)",
    "noise_scale_ranks": "B_simple, ranks (this step)",
    "noise_scale_ranks_ema": "B_simple, ranks (smoothed)",
    "noise_scale_micro": "B_simple, micro-batches (this step)",
    "noise_scale_micro_ema": "B_simple, micro-batches (smoothed)",
    "batch_size": "batch size in use",
}
"""Whole-model statistics (param ``"*"``) drawn in the B_simple chart, with their legend labels."""


def _matrix(frame: pd.DataFrame, column: str, series: list[dict[str, object]]) -> charts.StatMatrix:
    """A dense :class:`~bbdecoder.report.charts.StatMatrix` from long rows ``step, <column>, value``
    (one series per distinct ``column`` value, in the order of ``series``)."""
    keys = [str(s["key"]) for s in series]
    wide = frame.pivot_table(index="step", columns=column, values="value", aggfunc="last", dropna=False)
    wide = wide.reindex(columns=keys).sort_index()
    values = wide.to_numpy(dtype=float)
    stored = frame["value"].to_numpy(dtype=float)
    meta = [{k: v for k, v in s.items() if k != "key"} for s in series]
    return charts.StatMatrix(
        wide.index.to_numpy(dtype=np.int64), values, meta, int((~np.isfinite(stored)).sum())
    )


def gradient_noise(ctx: ReportContext) -> Section | None:
    """B_simple against the batch size, per-tensor gradient SNR, and the last per-sample step."""
    scalars = ctx.scalars
    model = scalars[(scalars["param"] == "*") & scalars["stat"].isin(list(NOISE_SERIES))]
    if not model["stat"].str.startswith("noise_scale").any():
        return None
    body = html.paragraph(
        "The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018) estimates the batch "
        "size beyond which a larger batch stops buying faster progress per sample: below it, doubling the "
        "batch nearly halves the steps needed; far above it, the extra samples are mostly wasted. Σ is the "
        "covariance of one sample's gradient and G the expected gradient, both unbiased estimates per step "
        "(their ratio is noisy, so the smoothed line divides the moving averages of numerator and "
        "denominator). From per-sample gradients (per_sample=), under DDP with noise_scale=True from the "
        "ranks' small-batch and averaged gradient norms, and with micro_noise_scale=True from the "
        "micro-batches of accumulated steps. Negative per-step estimates (|G|² estimated "
        "below zero: noise dominates) are not drawn on the log axis. Not to be confused with the 'var' "
        "statistic elsewhere in this report: the variance of a gradient's entries within one tensor."
    )
    present = [s for s in NOISE_SERIES if (model["stat"] == s).any()]
    series = [{"key": s, "layer_id": -1, "layer": "", "param": s} for s in present]
    positive = model.assign(value=model["value"].where(model["value"] > 0))
    body += ctx.chart(
        charts.line_chart(
            "noise-scale",
            "gradient noise scale B_simple against the batch size in use",
            _matrix(positive, "stat", series),
            "samples",
            log=True,
            labels=[NOISE_SERIES[s] for s in present],
            max_points=ctx.max_points,
        )
    )
    if (scalars["stat"] == "sample_var").any():
        from bbdecoder.viz.noise_plots import gradient_snr

        snr = gradient_snr(ctx.reader)
        params = list(dict.fromkeys(snr["param"]))
        params = ["*", *[p for p in params if p != "*"]]
        layer_of = dict(zip(scalars["param"], scalars["layer"], strict=False))
        snr_series = [
            {"key": p, "layer_id": -1, "layer": "" if p == "*" else str(layer_of.get(p, "")), "param": p}
            for p in params
        ]
        body += ctx.chart(
            charts.line_chart(
                "gradient-snr",
                "gradient signal-to-noise per tensor: ||G_B||² / (tr Σ / B), 1 = noise only",
                _matrix(snr.rename(columns={"snr": "value"}), "param", snr_series),
                "snr",
                log=True,
                labels=["whole model" if p == "*" else p for p in params],
                max_points=ctx.max_points,
            )
        )
        body += html.table(_last_step_table(scalars, snr), caption="the last per-sample step")
    return Section("noise-scale", "Gradient noise scale and per-sample statistics", body)


def _last_step_table(scalars: pd.DataFrame, snr: pd.DataFrame) -> pd.DataFrame:
    """Per tensor (whole model first) at the last per-sample step: the three per-sample statistics
    and the SNR."""
    wanted = scalars[scalars["stat"].isin(["sample_norm_mean", "sample_var", "sample_grad_sq"])]
    last = int(wanted["step"].max())
    table = wanted[wanted["step"] == last].pivot_table(index="param", columns="stat", values="value")
    table["snr"] = snr[snr["step"] == last].set_index("param")["snr"]
    order = ["*", *sorted(p for p in table.index if p != "*")]
    table = table.reindex(order).reset_index()
    table["param"] = table["param"].replace("*", "whole model")
    table.insert(0, "step", last)
    return table[["step", "param", "sample_norm_mean", "sample_var", "sample_grad_sq", "snr"]]


__all__ = ["NOISE_SERIES", "gradient_noise"]
