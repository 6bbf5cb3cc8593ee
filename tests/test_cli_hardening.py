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
from bbdecoder.cli import EXIT_OK, EXIT_UNREADABLE, EXIT_UNWRITABLE, EXIT_USAGE, main

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


def _png_header(path: Path, width: int, height: int, rows: int = 0) -> Path:
    """A greyscale PNG declaring ``width x height`` pixels; ``rows`` rows of real (zero) data, so a
    file of a few kB can claim gigapixels, as a decompression bomb does."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte + pixels
    data = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from bbdecoder.demo.digits import DigitsCNN

    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    torch.save(DigitsCNN().eval().state_dict(), root / "weights.pt")
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(root / "digit.png")
    _png_header(root / "bomb.png", 100_000, 100_000)  # 10 gigapixels: over twice Pillow's limit
    _png_header(root / "big.png", 10_000, 10_000, rows=10_000)  # 100 Mpx of real zeros, ~100 kB
    _png_header(root / "wide.png", 6_000, 6_000)  # under Pillow's limit, over the CLI's input budget
    return {"root": root}


def _digits(digits: dict[str, Path], *extra: str, image: str = "digit.png") -> list[str]:
    root = digits["root"]
    return [
        "explain", "--model", str(root / "weights.pt"), "--model-class", "bbdecoder.demo.digits:DigitsCNN",
        "--image", str(root / image), "--channels", "1", *extra,
    ]  # fmt: skip


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert err.startswith(f"bbdecoder {argv[0]}: error: "), err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return code, err


def test_bad_explain_values_are_usage_errors(digits, tmp_path: Path, capsys) -> None:
    """Item 13: each ended in a traceback, a NaN map, or an error blaming the model."""
    out = ["--out", str(tmp_path / "o.png")]
    cases = [
        (["--samples", "0", "--method", "smoothgrad"], "--samples must be between 1 and 10000, got 0"),
        (["--steps", "0", "--method", "ig"], "--steps must be between 1 and 10000, got 0"),
        (["--steps", "-5"], "--steps must be between 1 and 10000"),
        (["--mean", "0.1,0.2"], "--mean needs 1 or 1 values (one per channel of --channels 1), got 2"),
        (["--std", "1,1,1"], "--std needs 1 or 1 values"),
        (["--mean", "nan"], "--mean values must be finite"),
        (["--scale", "0"], "--scale must be a positive number"),
        (["--scale", "-1"], "--scale must be a positive number"),
        (["--scale", "nan"], "--scale must be a positive number"),
        (["--scale", "inf"], "--scale must be a positive number"),
        (["--layer", "1", "--method", "ig"], "--layer is used by the layer methods (gradcam, gradcam++"),
        (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
    ]
    for extra, message in cases:
        code, err = _error(_digits(digits, *extra, *out), capsys)
        assert code == EXIT_USAGE and message in err, (extra, err)
        assert "model does not accept" not in err, (extra, err)
    assert not (tmp_path / "o.png").exists()


def test_output_paths_are_checked_before_the_work(digits, tmp_path: Path, capsys) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "maps.npy").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "folder")], "--out " + str(tmp_path / "folder") + " is a folder"),
        (["--out", str(tmp_path / "file" / "o.png")], "is a file, not a folder"),
        (["--out", str(tmp_path / "o.xyz")], "Pillow cannot write '.xyz'"),
        (["--out", str(tmp_path / "o.png"), "--save-map", str(tmp_path / "maps.npy")], "--save-map"),
        (["--out", str(tmp_path / "o.png"), "--save-map", str(tmp_path / "maps")], "maps.npy is a folder"),
    ]
    for extra, message in cases:
        code, err = _error(_digits(digits, *extra), capsys)
        assert code == EXIT_USAGE and message in err, (extra, err)


def test_save_map_into_a_missing_folder_creates_it(digits, tmp_path: Path, capsys) -> None:
    target = tmp_path / "new" / "deeper" / "map.npy"
    code = main(
        _digits(digits, "--method", "gradient", "--out", str(tmp_path / "o.png"), "--save-map", str(target))
    )
    assert code == EXIT_OK, capsys.readouterr().err
    assert np.load(target).shape == (8, 8)


def test_a_full_disk_is_exit_7(digits, tmp_path: Path, capsys) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    (tmp_path / "o.png").symlink_to("/dev/full")
    (tmp_path / "m.npy").symlink_to("/dev/full")
    code, err = _error(_digits(digits, "--method", "gradient", "--out", str(tmp_path / "o.png")), capsys)
    assert code == EXIT_UNWRITABLE and f"cannot write {tmp_path / 'o.png'}" in err, err
    argv = _digits(
        digits,
        "--method",
        "gradient",
        "--out",
        str(tmp_path / "x.png"),
        "--save-map",
        str(tmp_path / "m.npy"),
    )
    code, err = _error(argv, capsys)
    assert code == EXIT_UNWRITABLE and "No space left on device" in err, err


def test_decompression_bombs_are_refused(digits, capsys) -> None:
    for image in ("bomb.png", "big.png"):
        code, err = _error(_digits(digits, image=image), capsys)
        assert code == EXIT_UNREADABLE and "refused to read" in err and "decompression bomb" in err, err


def test_absurd_sizes_are_refused_before_allocating(digits, capsys) -> None:
    """Item 10: the size check comes before the model is even loaded (a missing model file is not
    reported), so nothing of that size is ever allocated."""
    missing = ["--model", str(digits["root"] / "missing.pt")]
    code, err = _error(["explain", *missing, "--image", "x.png", "--size", "100000,100000"], capsys)
    assert code == EXIT_USAGE and "--size 100000,100000 asks for an input of 30,000,000,000 values" in err
    code, err = _error(["layers", *missing, "--input-size", "64,3,2048,2048"], capsys)
    assert code == EXIT_USAGE and "--input-size 64,3,2048,2048 asks for an input of 805,306,368 values" in err
    code, err = _error(_digits(digits, image="wide.png"), capsys)
    assert code == EXIT_USAGE and "(6000 x 6000 pixels)" in err and "pass --size H,W" in err


def test_export_of_a_damaged_store(tmp_path: Path, capsys) -> None:
    import sqlite3

    from bbdecoder.store import RunWriter

    RunWriter(tmp_path / "run").close()
    with sqlite3.connect(tmp_path / "run" / "run.sqlite") as db:
        db.execute("DROP TABLE scalars")
    code, err = _error(["export", str(tmp_path / "run"), "--csv", str(tmp_path / "csv")], capsys)
    assert code == EXIT_UNREADABLE and "cannot read the run store" in err and "no such table: scalars" in err
    (tmp_path / "taken").write_text("x")
    code, err = _error(["export", str(tmp_path / "run"), "--csv", str(tmp_path / "taken")], capsys)
    assert code == EXIT_USAGE and "--csv " in err and "is a file; pass a folder" in err


def test_demo_refuses_bad_values_and_an_unwritable_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    for extra, code, message in (
        (["--epochs", "0"], EXIT_USAGE, "--epochs must be between 1 and 1000, got 0"),
        (["--images", "-1"], EXIT_USAGE, "--images must be between 1 and 100, got -1"),
        (["--out", str(tmp_path / "file")], EXIT_USAGE, "is a file; pass a folder"),
        (["--out", str(tmp_path / "file" / "sub")], EXIT_UNWRITABLE, "cannot write the demo into"),
    ):
        got, err = _error(["demo", "--quick", "--no-progress", *extra], capsys)
        assert got == code and message in err, (extra, err)
