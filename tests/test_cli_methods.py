"""``explain`` with the registry's perturbation flags: ``--patch``, ``--window``, ``--masks``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bbdecoder import FeatureAblation, Occlusion
from bbdecoder.attribution.registry import patch_mask
from bbdecoder.cli import EXIT_OK, main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    scripted = torch.jit.script(model.eval())
    torch.jit.save(scripted, str(root / "model.pt"))
    pixels = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "digit.png")
    x = torch.tensor(pixels, dtype=torch.float32)[None, None] / 255.0
    return {"root": root, "model": model, "x": x}


def _explain(files: dict[str, object], tmp_path: Path, *extra: str) -> np.ndarray:
    root = files["root"]
    assert isinstance(root, Path)
    argv = ["explain", "--model", str(root / "model.pt"), "--image", str(root / "digit.png")]
    argv += ["--channels", "1", "--target", "1", "--out", str(tmp_path / "o.png"), "--save-map"]
    assert main([*argv, str(tmp_path / "m.npy"), *extra]) == EXIT_OK
    return np.load(tmp_path / "m.npy")


def test_patch_makes_a_feature_mask_of_squares(files: dict, tmp_path: Path) -> None:
    saved = _explain(files, tmp_path, "--method", "feature_ablation", "--patch", "3")
    mask = patch_mask(3, (1, 8, 8))
    assert mask.shape == (1, 1, 8, 8) and int(mask.max()) == 8  # 3 x 3 squares, the last ones cut
    expected = FeatureAblation(files["model"]).attribute(files["x"], 1, feature_mask=mask)[0, 0]
    np.testing.assert_allclose(saved, expected.numpy(), rtol=1e-5, atol=1e-6)
    shap = _explain(files, tmp_path, "--method", "kernel_shap", "--patch", "4", "--samples", "30")
    blocks = shap.reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)
    assert np.ptp(blocks, axis=1).max() == 0  # one Shapley value per 4 x 4 square


def test_window_and_stride_reach_occlusion(files: dict, tmp_path: Path) -> None:
    saved = _explain(files, tmp_path, "--method", "occlusion", "--window", "4", "--stride", "2")
    expected = Occlusion(files["model"]).attribute(files["x"], 1, sliding_window_shapes=4, strides=2)
    np.testing.assert_allclose(saved, expected[0, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_masks_reach_rise(files: dict, tmp_path: Path) -> None:
    few = _explain(files, tmp_path, "--method", "rise", "--masks", "8")
    more = _explain(files, tmp_path, "--method", "rise", "--masks", "16")
    assert few.shape == (8, 8) and (few >= 0).all() and not np.allclose(few, more)
