"""The HTML report: built from the run store alone, sections render when their data exists, every
embedded image is a valid PNG, tables round-trip through the store, failures stay visible."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import pyplot as plt
from PIL import Image
from torch import nn
from torch.nn import functional as F

from bbdecoder.monitor import Analyzer
from bbdecoder.report import (
    SECTIONS,
    ReportSectionWarning,
    Section,
    blob_section,
    build_report,
    latest_records,
    read_table,
    store_image,
    store_table,
)
from bbdecoder.store import RunWriter, open_run

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">')


def make_report_run(root: Path, *, blobs: bool = True, nonfinite: bool = False) -> Path:
    """A small training run (2 epochs, activations watched, function graph) and, with ``blobs``,
    one image or table for each blob section."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with Analyzer(net, root, input_size=(1, 1, 6, 6), activations=nn.ReLU) as analyzer:
        for _epoch in range(2):
            for _ in range(3):
                x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                loss = F.cross_entropy(analyzer.forward_propagation(x), y)
                optimizer.zero_grad()
                analyzer.backward_propagation(loss)
                optimizer.step()
            analyzer.end_epoch()
        analyzer.function_graph(torch.randn(1, 1, 6, 6))
        if nonfinite:
            loss = analyzer.forward_propagation(torch.randn(2, 1, 6, 6)).sum() * float("inf")
            optimizer.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                analyzer.backward_propagation(loss)
    if blobs:
        writer = RunWriter(root)
        figure, axis = plt.subplots(figsize=(3, 2))
        axis.imshow(np.random.default_rng(0).random((8, 8)))
        store_image(writer, "saliency grid", figure, section="saliency", caption="random map")
        store_table(
            writer,
            "deletion and insertion",
            pd.DataFrame({"method": ["FullGrad", "Gradient"], "deletion_auc": [0.1, float("nan")]}),
            section="metrics",
        )
        store_table(
            writer, "attention-iou", pd.DataFrame({"model": ["biased"], "iou": [0.42]}), section="bias"
        )
        figure, axis = plt.subplots(figsize=(3, 2))
        axis.bar([0, 1], [0.4, 0.2])
        store_image(writer, "group scores", figure, section="bias")
        store_table(
            writer, "demo summary", pd.DataFrame({"quantity": ["acc"], "value": [0.9]}), section="summary"
        )
        writer.close()
    return root


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_report_run(tmp_path_factory.mktemp("report_run"))


def chart_specs(text: str) -> list[dict]:
    """The chart specs of a page's inline JSON payload."""
    found = re.search(r'<script type="application/json" id="bbd-payload">(.*?)</script>', text, re.S)
    assert found is not None
    return json.loads(found.group(1))["charts"]


def section_ids(text: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', text)


def decoded_images(text: str) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for data, alt in IMG.findall(text):
        with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
            picture.load()
            out.append((alt, picture.size))
    return out


def test_full_report_has_every_section_and_only_embedded_images(report_run: Path, tmp_path: Path) -> None:
    page = build_report(report_run, tmp_path / "r.html")
    text = page.read_text()
    assert section_ids(text) == [
        "summary", "layers", "gradient-flow", "gradient-norms", "weights", "activations", "alerts",
        "nonfinite", "saliency", "metrics", "bias", "graph",
    ]  # fmt: skip
    images = decoded_images(text)
    assert len(images) == text.count("<img ")  # every <img> is an embedded, decodable PNG
    assert all(w > 50 and h > 50 for _, (w, h) in images)
    alts = [alt for alt, _ in images]
    assert {"saliency grid", "group scores", "weight histograms over epochs"} <= set(alts)
    charts = chart_specs(text)
    assert sum(c["id"].startswith("gradient-flow-") for c in charts) == 2  # first and last epoch
    assert {"loss", "grad-l2", "grad-l1", "update-ratio"} <= {c["id"] for c in charts}
    # everything inline: no script or stylesheet is loaded from anywhere
    assert re.findall(r"<script[^>]*\ssrc=", text) == [] and re.findall(r"<link[^>]*stylesheet", text) == []
    assert re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", text) == []
    assert "No non-finite (NaN or Inf) gradient was recorded." in text
    # the benign patterns are explained where they are shown (issue 15)
    assert "followed by BatchNorm" in text and "zero gradient by construction" in text
    assert "share of outputs that are exactly zero" in text
    assert "NaN" in text  # the NaN in the metrics table is shown, not dropped
    assert 'class="failed"' not in text


def test_report_from_the_store_file_alone_is_identical_but_for_the_time(
    report_run: Path, tmp_path: Path
) -> None:
    alone = tmp_path / "copy"
    alone.mkdir()
    shutil.copy(report_run / "run.sqlite", alone / "run.sqlite")
    for suffix in ("-wal", "-shm"):
        if (report_run / f"run.sqlite{suffix}").exists():
            shutil.copy(report_run / f"run.sqlite{suffix}", alone / f"run.sqlite{suffix}")
    first = build_report(report_run, tmp_path / "a.html", title="t").read_text()
    second = build_report(alone / "run.sqlite", title="t").read_text()
    assert (alone / "report.html").exists()
    strip = re.compile(r"report built [0-9: -]+")
    assert strip.sub("", first) == strip.sub("", second)


def test_run_without_blobs_still_gives_a_report(tmp_path: Path) -> None:
    run = make_report_run(tmp_path / "plain", blobs=False, nonfinite=True)
    text = build_report(run).read_text()
    ids = section_ids(text)
    assert "saliency" not in ids and "bias" not in ids and "metrics" not in ids
    assert {"summary", "gradient-flow", "nonfinite"} <= set(ids)
    assert "non-finite gradient at step" in text
    # an empty store (no training) gives the summary alone
    RunWriter(tmp_path / "empty").close()
    assert section_ids(build_report(tmp_path / "empty").read_text()) == ["summary"]


def test_custom_sections_and_a_failing_one(report_run: Path, tmp_path: Path) -> None:
    def costs(ctx) -> Section:
        return Section("costs", "Per-layer cost", f"<p>{len(ctx.layers)} layers</p>")

    def broken(ctx) -> Section:
        raise ValueError("no data for this")

    with pytest.warns(ReportSectionWarning, match="broken failed: no data for this"):
        text = build_report(report_run, tmp_path / "c.html", sections=[*SECTIONS, costs, broken]).read_text()
    ids = section_ids(text)
    assert ids[-2:] == ["costs", "failed-broken"]
    assert "<p>5 layers</p>" in text and "ValueError: no data for this" in text


def test_unclaimed_blob_sections_go_to_other_results(report_run: Path, tmp_path: Path) -> None:
    without_bias = [s for s in SECTIONS if getattr(s, "key", None) != "bias"]
    text = build_report(report_run, tmp_path / "o.html", sections=without_bias).read_text()
    assert "bias" not in section_ids(text) and section_ids(text)[-1] == "other"
    assert "[bias] group scores" in text
    text = build_report(
        report_run, tmp_path / "p.html", sections=[blob_section("bias", "Bias only")]
    ).read_text()
    assert section_ids(text) == ["bias"]


def test_table_and_image_blobs_round_trip(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    frame = pd.DataFrame({"name": ["a", "b"], "x": [1.5, float("nan")], "n": [3, 4]})
    store_table(writer, "t", frame, section="metrics", caption="cap")
    frame2 = frame.assign(x=[2.5, 3.5])
    store_table(writer, "t", frame2, section="metrics")  # a newer version of the same table
    with pytest.raises(ValueError, match="not PNG"):
        store_image(writer, "bad", b"GIF89a...", section="saliency")
    writer.close()
    reader = open_run(tmp_path)
    records = latest_records(reader, "table", "metrics")
    assert len(records) == 1
    pd.testing.assert_frame_equal(read_table(reader, int(records.blob_id[0])), frame2)
    first = reader.blobs(kind="table").blob_id.min()
    back = read_table(reader, int(first))
    assert back["name"].tolist() == ["a", "b"] and back["n"].tolist() == [3, 4]
    assert back["x"][0] == 1.5 and np.isnan(back["x"][1])
    reader.close()


def test_layer_table_says_why_output_shapes_are_missing_and_ratio_table_has_no_inf(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    nn.init.zeros_(net[0].bias)  # a zero-initialised bias: its first update ratio is ||dW|| / 0
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with Analyzer(net, tmp_path) as analyzer:  # no input_size: no output shapes
        for _ in range(3):
            loss = F.cross_entropy(analyzer.forward_propagation(torch.randn(5, 4)), torch.randint(0, 2, (5,)))
            optimizer.zero_grad()
            analyzer.backward_propagation(loss)
            optimizer.step()
    with open_run(tmp_path) as reader:
        ratios = reader.scalars("update_ratio")
    assert np.isfinite(ratios["value"]).all()  # the monitor stores ||dW|| where W was zero, never inf
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "run.sqlite")) as conn, conn:  # an older store's inf
        conn.execute(
            "UPDATE scalars SET value = 9e999 WHERE step = 0 AND stat_id = (SELECT stat_id FROM "
            "stat_names WHERE name = 'update_ratio') AND series_id IN (SELECT series_id FROM series "
            "WHERE param = '0.bias')"
        )
    with open_run(tmp_path) as reader:
        assert np.isinf(
            reader.scalars("update_ratio")["value"]
        ).any()  # the store holds an infinite ratio ...
    text = build_report(tmp_path).read_text()
    assert "3 layer(s) without an output shape" in text and "input_size=(1, C, H, W)" in text
    assert ">inf<" not in text.lower()  # ... the page shows no inf cell
    assert "update ratio(s) were infinite (the weight was exactly zero" in text
