"""The demo on its reduced setting (what `make demo` runs, smaller): every artefact, and the report
rebuilt from run.sqlite alone."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from bbdecoder.attribution import FullGrad, IntegratedGradients
from bbdecoder.cli import main
from bbdecoder.demo.digits import load_digits_data, train_digits_cnn
from bbdecoder.store import open_run

SECTIONS = re.compile(r'<section id="([^"]+)"')
IMAGES = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The quick demo with progress on, its stderr captured as a log would be (not a terminal)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, log.getvalue()


@pytest.fixture(scope="module")
def demo_dir(demo_run: tuple[Path, str]) -> Path:
    return demo_run[0]


def test_digits_cnn_trains_in_seconds_and_explains() -> None:
    model, accuracy = train_digits_cnn(epochs=3)
    assert accuracy > 0.85
    data = load_digits_data()
    x, y = data.x_test[:16], data.y_test[:16]
    fullgrad = FullGrad(model, im_size=(1, 8, 8))
    saliency = fullgrad.saliency(x, y)
    assert saliency.shape == (16, 1, 8, 8) and bool((saliency >= 0).all())
    assert fullgrad.last_relative_error is not None and fullgrad.last_relative_error.max() < 1e-4
    attributions, delta = IntegratedGradients(model).attribute(
        x, y, n_steps=64, method="gausslegendre", return_convergence_delta=True
    )
    with torch.no_grad():
        logit_gap = (model(x) - model(torch.zeros_like(x))).gather(1, y[:, None]).abs().squeeze(1)
    assert attributions.shape == x.shape
    assert bool((delta.abs() < 0.05 * logit_gap + 1e-3).all())


def test_demo_writes_every_artefact(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {p.relative_to(demo_dir).as_posix() for p in demo_dir.rglob("*") if p.is_file()}
    expected = {
        "run.sqlite",
        "report.html",
        "summary.json",
        "saliency_grid.png",
        "metrics/deletion_curves.png",
        "metrics/insertion_curves.png",
        "metrics/deletion_insertion.csv",
        "metrics/completeness.csv",
        "bias/attention_iou.csv",
        "bias/attention_iou_groups.csv",
        "figures/grad_flow_ep000.png",
        "figures/grad_flow_ep001.png",
        "figures/feature_evolution_conv2.gif",
        "figures/feature_evolution_conv2.png",
        "figures/layer_costs.png",
        "figures/architecture.png",
        "figures/grad_norms_ep001.png",
        "figures/function_graph.png",
        "figures/activation_curves.png",
        "figures/weight_hist_conv1.weight_ep001.png",
        "figures/weight_hist_fc.bias_ep001.png",
        "digits_cnn.pt",
        "digits_cnn_state_dict.pt",
        "shapes_cnn.pt",
        "shapes_cnn_state_dict.pt",
        "shapes/localization.csv",
        "shapes/check.csv",
        "shapes/saliency_grid.png",
    }
    assert expected <= files
    assert len([f for f in files if f.startswith("overlays/")]) == 2 * 5  # 2 images x 5 methods
    assert any(f.startswith("figures/activations_ep") for f in files)
    for name in files:
        path = demo_dir / name
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            with Image.open(path) as picture:
                picture.verify()
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert summary["fullgrad_completeness_max_rel_error"] < 1e-4
    # completeness against |F(x)| (not against F(x) - F(baseline), near zero for some samples)
    assert (
        summary["ig_completeness_error_vs_score_median"]
        <= summary["ig_completeness_error_vs_score_worst"]
        < 0.1
    )
    assert "ig_completeness_max_rel_error" not in summary
    assert 0 <= summary["test_accuracy"] <= 1
    assert 0 <= summary["fullgrad_deletion_auc"] <= 1 and 0 <= summary["gradcam_insertion_auc"] <= 1
    assert {"bias_spurious_iou_biased", "bias_spurious_iou_control"} <= set(summary)
    assert 0 <= summary["shapes_test_accuracy"] <= 1
    for method in (
        "fullgrad",
        "simplefullgrad",
        "integrated_gradients",
        "gradcam",
        "random_map",
        "sobel_edges",
    ):
        for score in ("pointing", "energy", "attention_iou"):
            assert 0 <= summary[f"shapes_{method}_{score}"] <= 1
    assert summary["shapes_explanations_beat_baselines"] in (0.0, 1.0)
    samples = sorted(f for f in files if f.startswith("samples/"))
    assert [f for f in samples if f.startswith("samples/shape_")] == [
        f"samples/shape_{i}.png" for i in range(4)
    ]
    assert len([f for f in samples if f.startswith("samples/digit_")]) == 3
    assert {"samples/shapes.csv", "samples/digits.csv"} <= files

    run = open_run(demo_dir)
    steps = run.steps()
    assert steps["epoch"].nunique() == 2 and steps["loss"].notna().all()
    blobs = run.blobs()
    sections = {(m.get("section", ""), name) for m, name in zip(blobs["meta"], blobs["name"], strict=True)}
    assert {
        ("saliency", "saliency grid"),
        ("metrics", "deletion and insertion"),
        ("metrics", "completeness"),
        ("bias", "attention-iou"),
        ("bias", "attention-iou by group"),
        ("summary", "demo summary"),
        ("saliency", "shapes saliency grid"),
        ("metrics", "shapes localization"),
        ("metrics", "shapes check"),
    } <= {s for s in sections if s[0] != ""}
    maps = run.blobs(kind="saliency")
    assert len(maps) == 5 and all(m["shape"] == [2, 1, 8, 8] for m in maps["meta"])
    run.close()

    page = (demo_dir / "report.html").read_text()
    assert SECTIONS.findall(page) == [
        "summary", "layers", "gradient-flow", "gradient-norms", "weights", "activations", "alerts",
        "nonfinite", "saliency", "metrics", "bias", "cost", "features", "architecture", "graph",
    ]  # fmt: skip
    assert 'class="failed"' not in page and not re.search(r"<script[^>]*\ssrc=", page)  # all inline


def test_report_rebuilds_from_the_store_alone(demo_dir: Path, tmp_path: Path, capsys) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(demo_dir / "run.sqlite", alone / "run.sqlite")  # the demo closed its store: no WAL left
    assert main(["report", str(alone)]) == 0
    assert f"wrote {alone / 'report.html'}" in capsys.readouterr().out
    original = (demo_dir / "report.html").read_text()
    rebuilt = (alone / "report.html").read_text()
    assert SECTIONS.findall(rebuilt) == SECTIONS.findall(original)
    assert IMAGES.findall(rebuilt) == IMAGES.findall(original)  # byte-identical embedded pictures


def test_export_csv_of_the_demo_run(demo_dir: Path, tmp_path: Path) -> None:
    import pandas as pd

    assert main(["export", str(demo_dir), "--csv", str(tmp_path / "csv")]) == 0
    scalars = pd.read_csv(tmp_path / "csv" / "scalars.csv", keep_default_na=False, na_values=[""])
    run = open_run(demo_dir)
    stored = run.scalars()
    assert len(scalars) == len(stored)
    pd.testing.assert_series_equal(scalars["value"], stored["value"], check_names=False)
    run.close()


def test_export_parquet_of_the_demo_run(demo_dir: Path, tmp_path: Path) -> None:
    import pandas as pd

    pytest.importorskip("pyarrow", reason="Parquet export needs pyarrow (in the dev extra)")
    assert main(["export", str(demo_dir), "--parquet", str(tmp_path / "pq")]) == 0
    run = open_run(demo_dir)
    tables = {"scalars": run.scalars(), "histograms": run.histograms(), "layers": run.layers()}
    for name, stored in tables.items():
        exported = pd.read_parquet(tmp_path / "pq" / f"{name}.parquet")
        pd.testing.assert_frame_equal(exported, stored, check_dtype=False)
    run.close()


def test_progress_in_a_log_is_a_few_plain_lines(demo_run: tuple[Path, str]) -> None:
    _, log = demo_run
    assert "\r" not in log  # no tqdm refreshes in a file
    lines = log.splitlines()
    assert len([line for line in lines if line.startswith("digits: epoch")]) == 2
    assert any(
        re.match(r"digits: epoch 2/2: (\d+)/\1 batches, loss=[\d.]+, test_acc=[\d.]+ \(", line)
        for line in lines
    )
    assert any(
        line.startswith("shapes: training ShapesCNN: 3/3 epochs") and "test_acc=" in line for line in lines
    )
    assert len(lines) < 12


def test_the_saved_models_explain_the_saved_samples_by_copy_paste(demo_dir: Path, tmp_path: Path) -> None:
    """The CLI examples of docs/cli_and_report.md, on the demo's own files."""
    sample = demo_dir / "samples" / "shape_0.png"
    out = tmp_path / "ig.png"
    args = ["explain", "--model", str(demo_dir / "shapes_cnn.pt"), "--image", str(sample), "--method", "ig"]
    assert main([*args, "--steps", "8", "--out", str(out)]) == 0  # TorchScript: no --trust-pickle
    assert out.stat().st_size > 0
    cam = tmp_path / "cam.npy"
    args = ["explain", "--model", str(demo_dir / "shapes_cnn_state_dict.pt")]
    args += [
        "--model-class",
        "bbdecoder.demo.shapes:ShapesCNN",
        "--image",
        str(sample),
        "--method",
        "fullgrad",
    ]
    assert main([*args, "--out", str(tmp_path / "fg.png"), "--save-map", str(cam)]) == 0
    import numpy as np

    assert np.load(cam).shape == (64, 64)
    digit = demo_dir / "samples" / "digit_0.png"
    args = ["explain", "--model", str(demo_dir / "digits_cnn.pt"), "--image", str(digit), "--channels", "1"]
    assert main([*args, "--method", "gradient", "--out", str(tmp_path / "digit.png")]) == 0
