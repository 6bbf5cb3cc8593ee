"""The report's gradient-noise section: its charts hold exactly the stored B_simple values (and
the batch size in use) and the per-tensor SNR; it is absent without noise-scale rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.report import build_report
from bbdecoder.store import RunWriter, open_run
from bbdecoder.viz.noise_plots import gradient_snr
from tests.test_report import chart_specs, section_ids


def _per_sample_run(path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    with Analyzer(model, path, per_sample=True) as analyzer:
        for step in range(8):
            batch = 8 if step < 4 else 16
            x = torch.randn(batch, 4, generator=gen)
            y = (x[:, 0] > 0).long()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            analyzer.step(loss=loss)
            optimizer.step()
    return path


def _chart(text: str, chart_id: str) -> dict:
    (chart,) = [c for c in chart_specs(text) if c["id"] == chart_id]
    return chart


def test_noise_section_charts_hold_the_stored_values(tmp_path: Path) -> None:
    run = _per_sample_run(tmp_path / "run")
    text = build_report(run, tmp_path / "r.html").read_text()
    ids = section_ids(text)
    assert ids.index("noise-scale") == ids.index("gradient-norms") + 1
    frame = open_run(run).scalars()
    model = frame[frame.param == "*"].pivot(index="step", columns="stat", values="value")
    chart = _chart(text, "noise-scale")
    by_label = {s["label"]: s["values"] for s in chart["series"]}
    assert chart["x"] == list(range(8)) and chart["log"]
    assert by_label["batch size in use"] == [8.0] * 4 + [16.0] * 4
    labels = {
        "noise_scale": "B_simple, per-sample (this step)",
        "noise_scale_ema": "B_simple, per-sample (smoothed)",
    }
    for stat, label in labels.items():
        stored = model[stat].to_numpy()
        drawn = np.array([math.nan if v is None else v for v in by_label[label]])
        positive = stored > 0
        np.testing.assert_allclose(drawn[positive], stored[positive], rtol=1e-4)  # 5 digits drawn
        assert np.isnan(drawn[~positive]).all()  # negative estimates are left off the log axis
    snr = gradient_snr(run)
    snr_chart = _chart(text, "gradient-snr")
    assert snr_chart["series"][0]["label"] == "whole model"
    for series in snr_chart["series"]:
        param = "*" if series["label"] == "whole model" else series["label"]
        want = snr[snr.param == param].sort_values("step").snr.to_numpy()
        np.testing.assert_allclose(np.array(series["values"], dtype=float), want, rtol=1e-4)
    assert "the last per-sample step" in text and "not to be confused" in text.lower()


def test_ranks_estimate_alone_and_no_noise_rows(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "ranks")
    series = writer.series_id(-1, "*")
    stat = writer.stat_id("noise_scale_ranks")
    for step, value in enumerate([5.0, -1.0, 7.0]):
        writer.add_step(step, 0, 1.0)
        writer.add_scalars([(step, 0, series, stat, value)])
    writer.close()
    text = build_report(tmp_path / "ranks", tmp_path / "ranks.html").read_text()
    assert "noise-scale" in section_ids(text)
    (only,) = _chart(text, "noise-scale")["series"]
    assert only["label"] == "B_simple, ranks (this step)" and only["values"] == [5.0, None, 7.0]
    assert not any(c["id"] == "gradient-snr" for c in chart_specs(text))
    with Analyzer(nn.Linear(2, 2), tmp_path / "plain") as plain:
        plain.model(torch.randn(3, 2)).sum().backward()
        plain.step()
    assert "noise-scale" not in section_ids(build_report(tmp_path / "plain", tmp_path / "p.html").read_text())


@pytest.fixture(autouse=True)
def _quiet() -> None:
    torch.set_num_threads(1)
