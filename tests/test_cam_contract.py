"""Every CAM: no trace left on the model (also on error), batch equals one-by-one, deterministic."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from bbdecoder import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from bbdecoder.attribution.cam import BaseCAM
from bbdecoder.hooks import count_hooks

from .cam_nets import LinearHead
from .nets import randomize_batchnorm

CAMS: list[type[BaseCAM]] = [
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    XGradCAM,
    LayerCAM,
    EigenCAM,
    ScoreCAM,
    AblationCAM,
]


class BNAct(nn.BatchNorm2d):
    """A parameter-owning module with a child (timm's BatchNormAct2d)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        BNAct(6),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        BNAct(6),
        LinearHead(6, 4),
    )
    model = randomize_batchnorm(model).double()
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    model[0].weight.requires_grad_(False)
    return model


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [m.training for m in model.modules()],
        "grads": [p.requires_grad for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "param_grads": [p.grad for p in model.parameters()],
    }


def _assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert count_hooks(model) == 0
    assert after["modes"] == before["modes"]
    assert after["grads"] == before["grads"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert all(g is None for g in after["param_grads"])


@pytest.mark.parametrize("cls", CAMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("eval_mode", [True, False])
def test_no_trace_batch_equals_one_by_one_deterministic(cls: type[BaseCAM], eval_mode: bool) -> None:
    model = _model()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = [0, 3, 1]
    before = _snapshot(model)
    cam = cls(model, "3", eval_mode=eval_mode)  # a BN+act module with a child
    batch = cam.saliency(x, targets)
    _assert_untouched(model, before)
    assert batch.shape == (3, 1, 8, 8) and bool((batch >= 0).all()) and bool((batch <= 1).all())
    if eval_mode:  # train-mode BatchNorm mixes the samples of a batch
        one_by_one = torch.cat([cam.saliency(x[i : i + 1], targets[i]) for i in range(3)])
        torch.testing.assert_close(batch, one_by_one)
    assert torch.equal(cam.saliency(x, targets), batch)
    _assert_untouched(model, before)


class Boom(Exception):
    pass


def _raise(_output: Any) -> torch.Tensor:
    raise Boom("target failed")


class FailsAfterLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:  # the recording pass succeeds, the next one fails
            raise Boom("forward failed")
        return x


@pytest.mark.parametrize("cls", CAMS, ids=lambda c: c.__name__)
def test_no_trace_on_error(cls: type[BaseCAM]) -> None:
    model = _model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = _snapshot(model)
    if cls is not EigenCAM:  # gradient-free and target-free: it never calls the target
        with pytest.raises(Boom):
            cls(model, "3").saliency(x, _raise)
        _assert_untouched(model, before)
    # a forward that fails halfway (after the layer's hook ran), in the default-layer probe too
    failing = _model()
    failing.insert(4, FailsAfterLayer())
    before = _snapshot(failing)
    with pytest.raises(Boom):
        cam = cls(failing)
        cam.saliency(x, [0, 1])
        cam.saliency(x, [0, 1])
    _assert_untouched(failing, before)


@pytest.mark.parametrize("cls", CAMS, ids=lambda c: c.__name__)
def test_bad_inputs_are_refused_before_any_forward(cls: type[BaseCAM]) -> None:
    model = _model()
    with pytest.raises(ValueError, match="unsqueeze"):  # the shared input check, before any forward
        cls(model).saliency(torch.randn(3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="unexpected keyword"):
        cls(model).saliency(torch.randn(1, 3, 8, 8, dtype=torch.float64), 0, abs=True)
    assert count_hooks(model) == 0


@pytest.mark.slow  # importing torch._dynamo alone takes 10-25 s on a loaded machine
def test_a_compiled_model_is_explained_through_its_eager_modules() -> None:
    model = _model().eval()
    compiled = torch.compile(model)  # lazy: nothing is compiled unless it is called
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for cls in (GradCAM, ScoreCAM):
        ours = cls(compiled, "3").saliency(x, [0, 1])
        torch.testing.assert_close(ours, cls(model, model[3]).saliency(x, [0, 1]))
        assert cls(compiled).layer_names == [] and cls(compiled, model[3]).layer is model[3]
