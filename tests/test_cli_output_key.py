"""``explain --output-key``: models returning a dict, a ModelOutput or a tuple (issue 11, item 2)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bbdecoder.cli import EXIT_INCOMPATIBLE, EXIT_OK, EXIT_USAGE, main

SOURCE = '''
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn


class ModelOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Result:
    features: torch.Tensor
    logits: torch.Tensor


class MultiHead(nn.Module):
    def __init__(self, mode="dict"):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 5)
        self.aux = nn.Linear(16, 3)

    def forward(self, x):
        h = self.pool(self.relu(self.conv(x))).flatten(1)
        logits, aux = self.head(h), self.aux(h)
        if self.mode == "dict":
            return {"hidden": h.unsqueeze(1), "logits": logits}
        if self.mode == "modeloutput":
            return ModelOutput(loss=None, logits=logits, hidden_states=h.unsqueeze(1))
        if self.mode == "scores":
            return {"scores": logits, "aux": aux}
        if self.mode == "tuple":
            return (logits, h.unsqueeze(1))
        if self.mode == "dataclass":
            return Result(features=h.unsqueeze(1), logits=logits)
        return logits
'''


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("multi")
    (root / "multi_def.py").write_text(SOURCE)
    sys.path.insert(0, str(root))
    import multi_def  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = multi_def.MultiHead().eval()
    torch.save(model.state_dict(), root / "weights.pt")
    pixels = (np.random.default_rng(2).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "digit.png")
    x = torch.tensor(pixels, dtype=torch.float32)[None, None] / 255.0
    yield {"root": root, "model": model, "x": x}
    sys.path.remove(str(root))
    sys.modules.pop("multi_def", None)


def _argv(multi: dict, tmp_path: Path, mode: str, *extra: str) -> list[str]:
    root = multi["root"]
    return [
        "explain", "--model", str(root / "weights.pt"), "--model-class", f"{root / 'multi_def.py'}:MultiHead",
        "--model-kwargs", json.dumps({"mode": mode}), "--image", str(root / "digit.png"), "--channels", "1",
        "--method", "gradient", "--target", "2", "--out", str(tmp_path / "o.png"),
        "--save-map", str(tmp_path / "m.npy"), *extra,
    ]  # fmt: skip


def _gradient(multi: dict, head: str) -> np.ndarray:
    """d head[:, 2] / d x, by hand on the plain-tensor model."""
    model, x = multi["model"], multi["x"].clone().requires_grad_(True)
    h = model.pool(model.relu(model.conv(x))).flatten(1)
    (grad,) = torch.autograd.grad(getattr(model, head)(h)[0, 2], x)
    return grad[0, 0].numpy()


@pytest.mark.parametrize(
    ("mode", "key", "head"),
    [
        ("dict", None, "head"),  # default: "logits"
        ("modeloutput", None, "head"),
        ("dataclass", None, "head"),  # an attribute .logits
        ("scores", "scores", "head"),
        ("scores", "aux", "aux"),
        ("tuple", "0", "head"),
        ("tensor", None, "head"),
    ],
)
def test_output_key_selects_the_explained_tensor(multi, tmp_path: Path, capsys, mode, key, head) -> None:
    extra = [] if key is None else ["--output-key", key]
    code = main(_argv(multi, tmp_path, mode, *extra))
    _, err = capsys.readouterr()
    assert code == EXIT_OK, err
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), _gradient(multi, head), rtol=1e-4, atol=1e-7)


def test_gradcam_on_a_model_returning_a_model_output(multi, tmp_path: Path, capsys) -> None:
    argv = _argv(multi, tmp_path, "modeloutput", "--output-key", "logits")
    argv[argv.index("gradient")] = "gradcam"
    assert main([*argv, "--layer", "conv"]) == EXIT_OK, capsys.readouterr().err
    assert np.load(tmp_path / "m.npy").shape == (8, 8)


def test_output_key_errors(multi, tmp_path: Path, capsys) -> None:
    cases = [
        (
            "scores",
            [],
            EXIT_INCOMPATIBLE,
            "a dict with keys 'scores', 'aux': pick the logits with --output-key",
        ),
        ("tuple", [], EXIT_INCOMPATIBLE, "a tuple of 2 items: pick the logits with --output-key"),
        (
            "scores",
            ["--output-key", "logits"],
            EXIT_USAGE,
            "--output-key 'logits' is not in the model's output",
        ),
        ("tuple", ["--output-key", "5"], EXIT_USAGE, "use an index 0..1"),
        ("tuple", ["--output-key", "1"], EXIT_INCOMPATIBLE, "(--output-key 1); explain needs logits"),
        ("tensor", ["--output-key", "logits"], EXIT_USAGE, "the model returns one tensor"),
        ("dataclass", ["--output-key", "nothing"], EXIT_USAGE, "is not in the model's output, a Result"),
    ]
    for mode, extra, code, message in cases:
        got = main(_argv(multi, tmp_path, mode, *extra))
        err = capsys.readouterr().err
        assert got == code and err.startswith("bbdecoder explain: error: ") and message in err, (mode, err)


def test_the_printed_probability_is_not_a_softmax_of_probabilities() -> None:
    from bbdecoder.cli import class_probabilities

    logits = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    expected = torch.softmax(logits, dim=1)
    torch.testing.assert_close(class_probabilities(logits), expected)
    torch.testing.assert_close(class_probabilities(expected), expected)  # a softmax head's output
    torch.testing.assert_close(class_probabilities(torch.log_softmax(logits, dim=1)), expected)
