"""The report section of :class:`~bbdecoder.monitor.transformer_probes.TransformerProbes`: one chart per
probe statistic (per-block activation RMS, max |a| and kurtosis, per-head attention entropy, logits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bbdecoder.report import charts, html
from bbdecoder.report.html import Section

if TYPE_CHECKING:
    from bbdecoder.report.sections import ReportContext

_TITLES = {
    "act_rms": ("activation RMS per block", True),
    "act_max_abs": ("max |activation| per block", True),
    "act_kurtosis": ("activation kurtosis per block (3 = Gaussian; large = outlier features)", True),
    "attn_entropy": ("attention entropy per head (nats)", False),
    "logit_mean": ("mean output logit", False),
    "logit_max": ("max output logit", False),
}


def transformer_probes(ctx: ReportContext) -> Section | None:
    """Charts of the stored probe statistics; ``None`` when the run has none."""
    body = ""
    for stat, (title, log) in _TITLES.items():
        matrix = charts.stat_matrix(ctx.reader, stat, params_only=True)
        if matrix is None:
            continue
        body += ctx.chart(
            charts.line_chart(
                f"probe-{stat}", f"{title}, per step", matrix, stat, log=log, max_points=ctx.max_points
            )
        )
    if not body:
        return None
    intro = html.paragraph(
        "Statistics of the transformer probes, per training step, over the non-padding tokens: each "
        "block's output RMS, max |a| and kurtosis over the hidden dimension (growing outliers show as a "
        "rising max and kurtosis), each head's attention entropy (low = attention focused on few keys; "
        "collapse to zero early is a known instability), and the output logits' mean and max."
    )
    return Section("transformer-probes", "Transformer probes", intro + body)


__all__ = ["transformer_probes"]
