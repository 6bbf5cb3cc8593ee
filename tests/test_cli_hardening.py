"""The CLI's argument checks from issue 16 (items 10, 11, 13): each bad input ends in one
``bbdecoder <cmd>: error: ...`` line and the documented exit code, never in a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bbdecoder.attribution import GradCAM
from bbdecoder.cli import EXIT_OK, EXIT_USAGE, main

NESTED_SOURCE = '''
import torch
from torch import nn


class Nested(nn.Sequential):
    """Leaf IDs: 0 "0.0" conv, 1 "0.1" relu, 2 "1.0" conv, 3 "1.1" relu, 4 "2" conv, 5 "3" relu,
    6 "4" pool, 7 "5" flatten, 8 "6" linear: the module named "2" is leaf ID 4."""

    def __init__(self):
        super().__init__(
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
'''


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("nested")
    (root / "nested_def.py").write_text(NESTED_SOURCE)
    sys.path.insert(0, str(root))
    import nested_def  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = nested_def.Nested().eval()
    torch.save(model.state_dict(), root / "weights.pt")
    pixels = (np.random.default_rng(1).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "digit.png")
    yield {"root": root, "model": model}  # type: ignore[misc]
    sys.path.remove(str(root))
    sys.modules.pop("nested_def", None)


def _explain(nested: dict, tmp_path: Path, *extra: str) -> list[str]:
    root = nested["root"]
    return [
        "explain", "--model", str(root / "weights.pt"), "--model-class", f"{root / 'nested_def.py'}:Nested",
        "--image", str(root / "digit.png"), "--channels", "1", "--method", "gradcam", "--target", "1",
        "--out", str(tmp_path / "o.png"), *extra,
    ]  # fmt: skip


def test_an_all_digit_layer_is_the_leaf_id_the_layers_table_shows(nested, tmp_path: Path, capsys) -> None:
    """Item 11: --layer 2 is leaf ID 2 ("1.0"), not the module named "2" (leaf ID 4)."""
    root, model = nested["root"], nested["model"]
    main(["layers", "--model", str(root / "weights.pt"), "--model-class", f"{root / 'nested_def.py'}:Nested"])
    table = {row.split()[0]: row.split()[1] for row in capsys.readouterr().out.splitlines()[1:]}
    assert table["2"] == "1.0" and table["4"] == "2"
    x = torch.tensor(np.asarray(Image.open(root / "digit.png"), dtype=np.float32) / 255.0)[None, None]
    cams = {
        name: GradCAM(model, module).saliency(x, 1)[0, 0].detach().numpy()
        for name, module in (("1.0", model[1][0]), ("2", model[2]))
    }
    assert not np.allclose(cams["1.0"], cams["2"], atol=1e-3)  # the two layers differ
    for layer, expected in (("2", "1.0"), ("1.0", "1.0"), ("4", "2")):
        code = main(_explain(nested, tmp_path, "--layer", layer, "--save-map", str(tmp_path / "m.npy")))
        assert code == EXIT_OK, capsys.readouterr().err
        np.testing.assert_allclose(np.load(tmp_path / "m.npy"), cams[expected], rtol=1e-5, atol=1e-6)
    capsys.readouterr()


def test_layer_selection_errors(nested, tmp_path: Path, capsys) -> None:
    for layer, message in (
        ("999", "no leaf layer with ID 999; this model's IDs are 0..8"),
        ("9.1", "no leaf layer is named '9.1'"),
        ("*.0", "matches 2 layers"),
    ):
        code = main(_explain(nested, tmp_path, "--layer", layer))
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, err
        assert err.startswith("bbdecoder explain: error: --layer ") and message in err, err
