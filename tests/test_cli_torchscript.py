"""The CLI loads TorchScript files without torch 2.13's blanket DeprecationWarning for torch.jit.load
(the file still loads and computes what the scripted model did); other warnings are not swallowed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bbdecoder.cli import load_model, load_torchscript, main


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


def scripted(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = Net().eval()
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # scripting and saving have deprecation warnings of their own
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path, model


@pytest.mark.filterwarnings("error")
def test_a_torchscript_file_loads_without_a_warning(tmp_path: Path) -> None:
    path, model = scripted(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(str(path))
    assert [str(w.message) for w in caught] == []
    assert isinstance(loaded, torch.jit.ScriptModule) and not loaded.training
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.filterwarnings("error")
def test_the_layers_command_on_a_torchscript_file_is_warning_free(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = scripted(tmp_path)
    assert main(["layers", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "fc" in out


def test_only_the_jit_load_deprecation_is_silenced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = scripted(tmp_path)
    real = torch.jit.load

    def noisy(*args: object, **kwargs: object) -> object:
        warnings.warn("something else about this file", UserWarning, stacklevel=2)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.jit, "load", noisy)
    with pytest.warns(UserWarning, match="something else"):
        load_torchscript(path)
