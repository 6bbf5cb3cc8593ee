"""No code from a ``--model`` file runs unless ``--trust-pickle`` is given (issue 16, item 1).

Every file here is a real malicious pickle: unpickling it writes a marker file. Without the flag the
CLI refuses it (exit 4, a message naming ``--trust-pickle``) and the marker never appears; with the
flag the same file does write the marker, which proves each payload is live.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bbdecoder.cli import EXIT_OK, EXIT_UNREADABLE, main
from bbdecoder.demo.digits import DigitsCNN


class ExecPayload:
    """Unpickling calls ``exec`` on code that writes the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class SystemPayload:
    """Unpickling calls ``os.system`` (the classic form)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


class CarryingModel(nn.Module):
    """A working model that carries a payload in an attribute (a poisoned ``torch.save(model)``)."""

    def __init__(self, payload: object) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.payload = payload

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _state_dict_with(payload: object) -> dict[str, object]:
    state: dict[str, object] = dict(DigitsCNN().state_dict())
    state["fc.bias"] = payload  # looks like any other state_dict entry
    return state


def _raw_pickle(path: Path, payload: object) -> None:
    # Not a torch file at all: the full torch.load unpickles it as the legacy magic number (running
    # the payload), then calls the file corrupt.
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=2)


def _zip_with_payload_and_code_folder(path: Path, payload: object) -> None:
    # A torch.save zip made to look like TorchScript (it has a code/ folder).
    torch.save(payload, path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{path.stem}/code/__torch__.py", "")


FORMS: dict[str, Callable[[Path, Path], None]] = {
    "top-level object, zip": lambda p, m: torch.save(ExecPayload(m), p),
    "top-level object, os.system": lambda p, m: torch.save(SystemPayload(m), p),
    "top-level object, legacy format": lambda p, m: torch.save(
        ExecPayload(m), p, _use_new_zipfile_serialization=False
    ),
    "inside a state_dict, zip": lambda p, m: torch.save(_state_dict_with(ExecPayload(m)), p),
    "inside a state_dict, legacy format": lambda p, m: torch.save(
        _state_dict_with(ExecPayload(m)), p, _use_new_zipfile_serialization=False
    ),
    "nested in a list in a dict": lambda p, m: torch.save({"model": [1, {"x": ExecPayload(m)}]}, p),
    "attribute of a whole pickled model": lambda p, m: torch.save(CarryingModel(ExecPayload(m)), p),
    "raw pickle that torch calls corrupt": lambda p, m: _raw_pickle(p, ExecPayload(m)),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(path)
    return path


def _commands(model: Path, image: Path) -> dict[str, list[str]]:
    return {
        "layers": ["layers", "--model", str(model)],
        "layers --input-size": ["layers", "--model", str(model), "--input-size", "1,1,8,8"],
        "explain": ["explain", "--model", str(model), "--image", str(image), "--channels", "1"],
        "explain with --model-class": [
            "explain", "--model", str(model), "--image", str(image), "--channels", "1",
            "--model-class", "bbdecoder.demo.digits:DigitsCNN",
        ],
    }  # fmt: skip


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_malicious_model_file_never_runs_without_trust_pickle(
    form: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    model = tmp_path / "model.pt"
    FORMS[form](model, marker)
    assert not marker.exists()  # saving did not run the payload
    for name, argv in _commands(model, image).items():
        code = main(argv)
        err = capsys.readouterr().err
        assert not marker.exists(), f"{form}: {name} ran the payload"
        assert code == EXIT_UNREADABLE, (form, name, err)
        assert err.startswith(f"bbdecoder {argv[0]}: error: refused to load {model}"), (form, name, err)
        assert "--trust-pickle" in err and "Traceback" not in err, (form, name, err)
    # The same file with the flag: the full unpickler runs the payload, so the test above is real.
    main(["layers", "--model", str(model), "--trust-pickle"])
    capsys.readouterr()
    assert marker.exists(), f"{form}: the payload is not live"


def test_a_payload_in_a_fake_torchscript_archive_never_runs(tmp_path: Path, capsys) -> None:
    marker, model = tmp_path / "marker", tmp_path / "model.pt"
    _zip_with_payload_and_code_folder(model, ExecPayload(marker))
    for flags in ([], ["--trust-pickle"]):  # TorchScript is never unpickled by Python
        code = main(["layers", "--model", str(model), *flags])
        err = capsys.readouterr().err
        assert code == EXIT_UNREADABLE and err.startswith("bbdecoder layers: error: cannot read a model")
        assert not marker.exists()


def test_the_refusal_names_the_object_and_the_safe_formats(tmp_path: Path, capsys) -> None:
    torch.save(DigitsCNN().eval(), tmp_path / "whole.pt")
    code = main(["layers", "--model", str(tmp_path / "whole.pt")])
    err = capsys.readouterr().err
    assert code == EXIT_UNREADABLE
    assert "bbdecoder.demo.digits.DigitsCNN" in err  # what the pickle asked for
    assert "torch.jit.save" in err and "--model-class" in err and "--trust-pickle" in err
    code = main(["layers", "--model", str(tmp_path / "whole.pt"), "--trust-pickle"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "conv1" in out


def test_state_dicts_and_torchscript_need_no_flag(tmp_path: Path, capsys) -> None:
    model = DigitsCNN().eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    cls = ["--model-class", "bbdecoder.demo.digits:DigitsCNN"]
    for argv in (
        ["--model", str(tmp_path / "weights.pt"), *cls],
        ["--model", str(tmp_path / "legacy.pt"), *cls],
        ["--model", str(tmp_path / "scripted.pt")],
    ):
        code = main(["layers", *argv])
        out, err = capsys.readouterr()
        assert code == EXIT_OK and "conv1" in out, (argv, err)


def test_refusal_through_the_installed_entry_point(tmp_path: Path) -> None:
    """The real process: exit status 4, one error line on stderr, no marker."""
    marker, model = tmp_path / "marker", tmp_path / "model.pt"
    torch.save(SystemPayload(marker), model)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "bbdecoder.cli", "layers", "--model", str(model)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_UNREADABLE, done.stderr
    assert done.stderr.startswith("bbdecoder layers: error: refused to load")
    assert "--trust-pickle" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not marker.exists()
