"""The demo on a reduced setting, and the CLI's paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from bbdecoder.attribution import FullGrad, IntegratedGradients
from bbdecoder.cli import main
from bbdecoder.demo.digits import DigitsCNN, load_digits_data, train_digits_cnn
from bbdecoder.demo.run import run_demo


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, float]:
    return train_digits_cnn(epochs=3)


def test_digits_cnn_trains_in_seconds_and_explains(trained) -> None:
    model, accuracy = trained
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
    assert attributions.shape == x.shape
    with torch.no_grad():
        logit_gap = (model(x) - model(torch.zeros_like(x))).gather(1, y[:, None]).abs().squeeze(1)
    assert bool((delta.abs() < 0.05 * logit_gap + 1e-3).all())


def test_demo_writes_every_artefact(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", epochs=1, n_images=2)
    names = {path.name for path in result.files}
    assert {"saliency_grid.png", "summary.json"} <= names
    assert len([p for p in result.files if p.parent.name == "overlays"]) == 2 * 5
    for path in result.files:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            with Image.open(path) as picture:
                picture.verify()
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["fullgrad_completeness_max_rel_error"] < 1e-4
    assert 0 <= summary["test_accuracy"] <= 1


def test_cli_layers_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / "model.pt"
    torch.save(DigitsCNN(), model_path)
    assert main(["layers", "--model", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "Conv2d" in out and out.splitlines()[0].split()[0] == "0"
    assert main(["layers", "--model", str(tmp_path / "missing.pt")]) == 2
    assert "no such model file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("not a model")
    assert main(["layers", "--model", str(tmp_path / "junk.pt")]) == 2
    assert "cannot read a model" in capsys.readouterr().err
    torch.save(DigitsCNN().state_dict(), tmp_path / "weights.pt")
    assert main(["layers", "--model", str(tmp_path / "weights.pt")]) == 2
    assert "state_dict" in capsys.readouterr().err
