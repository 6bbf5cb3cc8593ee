"""The CLI's commands and error paths: each error has its message and exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bbdecoder import get_method
from bbdecoder.cli import (
    EXIT_DEPENDENCY,
    EXIT_INCOMPATIBLE,
    EXIT_MISSING,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    METHODS,
    main,
)
from bbdecoder.demo.digits import DigitsCNN
from bbdecoder.store import RunWriter


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    torch.save(model, root / "model.pt")
    torch.save(model.state_dict(), root / "weights.pt")
    torch.jit.save(torch.jit.script(model), root / "scripted.pt")
    (root / "junk.pt").write_text("not a model")
    pixels = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "digit.png")
    Image.fromarray(np.stack([pixels] * 3, axis=2)).resize((16, 16)).save(root / "rgb.png")
    (root / "model_def.py").write_text(
        "from bbdecoder.demo.digits import DigitsCNN\n\nclass Wide(DigitsCNN):\n    pass\n"
    )
    return {"root": root, "model": model}  # type: ignore[dict-item]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_table_with_output_shapes(files, capsys) -> None:
    root = files["root"]
    code, out, _ = run(
        ["layers", "--model", str(root / "model.pt"), "--trust-pickle", "--input-size", "2,1,8,8"], capsys
    )
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == [str(i) for i in range(len(rows))]
    by_name = {r[1]: r for r in rows}
    assert by_name["conv1"][2] == "Conv2d" and by_name["conv1"][3] == "160"
    # shapes: an independent forward pass through the same modules
    model = files["model"]
    with torch.no_grad():
        h = model.conv2(model.relu1(model.bn1(model.conv1(torch.zeros(2, 1, 8, 8)))))
    assert " ".join(by_name["conv2"][4:]) == str(list(h.shape))
    assert " ".join(by_name["pool"][4:]) == "[2, 32, 4, 4]"
    assert " ".join(by_name["fc"][4:]) == "[2, 10]"


def test_layers_error_paths(files, capsys) -> None:
    root = files["root"]
    trusted = ["--model", str(root / "model.pt"), "--trust-pickle"]
    cases = [
        (["--model", str(root / "missing.pt")], EXIT_MISSING, "no such model file"),
        (["--model", str(root / "junk.pt")], EXIT_UNREADABLE, "cannot read a model"),
        (["--model", str(root / "weights.pt")], EXIT_UNREADABLE, "holds a state_dict"),
        (["--model", str(root / "model.pt")], EXIT_UNREADABLE, "--trust-pickle"),
        ([*trusted, "--input-size", "1,x,8"], EXIT_USAGE, "comma-separated"),
        ([*trusted, "--input-size", "1,3,8,8"], EXIT_INCOMPATIBLE, "(1, 3, 8, 8)"),
        (["--model", str(root / "weights.pt"), "--model-class", "nomodule"], EXIT_USAGE, "module:Class"),
        (["--model", str(root / "weights.pt"), "--model-class", "bbdecoder.nothing:X"], EXIT_UNREADABLE,
         "cannot import"),
        (["--model", str(root / "weights.pt"), "--model-class", "bbdecoder.demo.digits:DigitsCNN",
          "--model-kwargs", '{"width": 8}'], EXIT_UNREADABLE, "does not fit"),
        (["--model", str(root / "weights.pt"), "--model-class", "bbdecoder.demo.digits:DigitsCNN",
          "--model-kwargs", "{width"], EXIT_USAGE, "JSON object"),
    ]  # fmt: skip
    for args, code, message in cases:
        got, _, err = run(["layers", *args], capsys)
        assert got == code, (args, err)
        assert message in err and err.startswith("bbdecoder layers: error: "), (args, err)


def test_state_dict_with_model_class_and_a_source_file(files, capsys) -> None:
    root = files["root"]
    code, out, _ = run(
        ["layers", "--model", str(root / "weights.pt"), "--model-class", "bbdecoder.demo.digits:DigitsCNN"],
        capsys,
    )
    assert code == 0 and "conv3" in out
    spec = f"{root / 'model_def.py'}:Wide"
    code, out, err = run(["layers", "--model", str(root / "weights.pt"), "--model-class", spec], capsys)
    assert code == 0, err
    assert "fc" in out
    sys.modules.pop("model_def", None)


@pytest.mark.parametrize("method", METHODS)
def test_explain_every_method_writes_an_overlay(files, capsys, method: str, tmp_path: Path) -> None:
    """Every registered method on a CNN; the attention rollouts refuse it by name (they need a ViT)."""
    root = files["root"]
    out = tmp_path / f"{method}.png"
    argv = [
        "explain",
        "--model",
        str(root / "model.pt"),
        "--trust-pickle",
        "--image",
        str(root / "digit.png"),
        "--channels",
        "1",
    ]
    code, stdout, err = run(
        [*argv, "--method", method, "--out", str(out), "--steps", "8", "--samples", "4", "--masks", "64"],
        capsys,
    )
    if get_method(method).family == "rollout":
        assert code == EXIT_INCOMPATIBLE and "found no attention weights" in err, err
        return
    assert code == 0, err
    assert f"wrote {out}" in stdout
    with Image.open(out) as picture:
        assert picture.size == (256, 256) and picture.mode == "RGB"


def test_explain_gradient_map_equals_autograd(files, capsys, tmp_path: Path) -> None:
    """The saved map of --method gradient with normalisation flags: d score / d pixel, by hand."""
    root = files["root"]
    argv = [
        "explain",
        "--model",
        str(root / "model.pt"),
        "--trust-pickle",
        "--image",
        str(root / "digit.png"),
        "--channels",
        "1",
    ]
    argv += ["--method", "gradient", "--target", "3", "--mean", "0.5", "--std", "0.25"]
    code, stdout, err = run(
        [*argv, "--out", str(tmp_path / "g.png"), "--save-map", str(tmp_path / "g.npy")], capsys
    )
    assert code == 0, err
    pixels = np.asarray(Image.open(root / "digit.png").convert("L"), dtype=np.float64) / 255.0
    x = torch.tensor(pixels, dtype=torch.float64)[None, None].requires_grad_(True)
    model = files["model"].double()
    score = model((x - 0.5) / 0.25)[0, 3]
    (grad,) = torch.autograd.grad(score, x)
    files["model"].float()
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), grad[0, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert "explained class 3" in stdout


def test_explain_torchscript_and_resize(files, capsys, tmp_path: Path) -> None:
    root = files["root"]
    base = ["explain", "--model", str(root / "scripted.pt"), "--image", str(root / "rgb.png")]
    code, _, err = run([*base, "--channels", "1", "--size", "8,8", "--method", "ig", "--steps", "8",
                        "--out", str(tmp_path / "ig.png")], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run([*base, "--channels", "1", "--size", "8,8", "--method", "fullgrad"], capsys)
    assert code == EXIT_INCOMPATIBLE and "TorchScript" in err and "forward hooks" in err


def test_explain_error_paths(files, capsys) -> None:
    root = files["root"]
    model, image = str(root / "model.pt"), str(root / "digit.png")
    cases = [
        (["--model", model, "--image", str(root / "none.png")], EXIT_MISSING, "no such image file"),
        (["--model", model, "--image", str(root / "junk.pt")], EXIT_UNREADABLE, "cannot read an image"),
        (["--model", model, "--image", image], EXIT_INCOMPATIBLE, "an image of shape (1, 3, 8, 8)"),
        (["--model", model, "--image", image, "--channels", "1", "--target", "10"], EXIT_USAGE, "range"),
        (["--model", model, "--image", image, "--channels", "2"], EXIT_USAGE, "--channels must be 1 or 3"),
        (["--model", model, "--image", image, "--channels", "1", "--size", "8"], EXIT_USAGE, "--size"),
        (["--model", model, "--image", image, "--channels", "1", "--std", "0"], EXIT_USAGE, "positive"),
        (["--model", model, "--image", image, "--channels", "1", "--mean", "a"], EXIT_USAGE, "--mean"),
        (["--model", str(root / "junk.pt"), "--image", image], EXIT_UNREADABLE, "cannot read a model"),
    ]  # fmt: skip
    for args, code, message in cases:
        got, _, err = run(["explain", *args, "--trust-pickle"], capsys)
        assert got == code, (args, err)
        assert message in err, (args, err)
    _, _, err = run(["explain", "--model", model, "--trust-pickle", "--image", image], capsys)
    assert "--channels" in err  # a shape mismatch names the flags that fix it


def test_unknown_method_and_missing_arguments_are_usage_errors(files, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--model", "m.pt", "--image", "i.png", "--method", "lime"])
    assert exit_info.value.code == EXIT_USAGE and "invalid choice: 'lime'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "somewhere"])
    assert exit_info.value.code == EXIT_USAGE
    required = "one of the arguments --tensorboard --csv --parquet --mlflow --wandb is required"
    assert required in capsys.readouterr().err


def test_report_and_export_error_paths(tmp_path: Path, capsys) -> None:
    code, _, err = run(["report", str(tmp_path / "nothing")], capsys)
    assert code == EXIT_MISSING and "no such run folder" in err
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert code == EXIT_MISSING and "holds no run store" in err
    (tmp_path / "run.sqlite").write_text("junk junk junk")
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert code == EXIT_UNREADABLE and "not a bbdecoder run store" in err
    code, _, err = run(["export", str(tmp_path / "nothing"), "--csv", str(tmp_path / "c")], capsys)
    assert code == EXIT_MISSING and "no such run folder" in err


def test_export_parquet_without_pyarrow(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    RunWriter(tmp_path / "run").close()
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    code, _, err = run(["export", str(tmp_path / "run"), "--parquet", str(tmp_path / "pq")], capsys)
    assert code == EXIT_DEPENDENCY and "pip install pyarrow" in err


def test_export_tensorboard_without_tensorboard(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    RunWriter(tmp_path / "run").close()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, _, err = run(["export", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")], capsys)
    assert code == EXIT_DEPENDENCY and "pip install tensorboard" in err


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("bbdecoder ")


def test_model_file_that_is_not_a_module(tmp_path: Path, capsys) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    code, _, err = run(["layers", "--model", str(tmp_path / "list.pt")], capsys)
    assert code == EXIT_UNREADABLE and "holds a list, not a torch.nn.Module" in err
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    code, out, err = run(["layers", "--model", str(tmp_path / "tensor.pt")], capsys)
    assert (code, out) == (EXIT_UNREADABLE, "")
    assert err == f"bbdecoder layers: error: {tmp_path / 'tensor.pt'} holds a Tensor, not a torch.nn.Module\n"
