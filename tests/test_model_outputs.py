"""Models returning ModelOutput/dict/namedtuple outputs, callable targets, and softmax heads."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import (
    FullGrad,
    GradCAM,
    Gradient,
    IntegratedGradients,
    SimpleFullGrad,
    SmoothGrad,
    TargetError,
)
from bbdecoder.attribution.outputs import ProbabilityOutputError, model_output, probability_kind
from bbdecoder.hooks import count_hooks
from bbdecoder.metrics import completeness, deletion

from .nets import randomize_batchnorm


@dataclass
class ClassifierOutput(OrderedDict):  # type: ignore[type-arg]
    """Shaped like transformers' ModelOutput: a dataclass that is also an OrderedDict of its set fields."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


class Pair(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


def trunk(classes: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, classes),
    )
    return randomize_batchnorm(net).double().eval()


class Wrapped(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = trunk()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.net(x)
        if self.kind == "modeloutput":
            return ClassifierOutput(logits=logits, hidden_states=x.mean())
        if self.kind == "dict":
            return {"features": x.flatten(1)[:, :3], "logits": logits}
        if self.kind == "namedtuple":
            return Pair(logits, x.flatten(1)[:, :3])
        if self.kind == "tuple":
            return (logits, x)
        if self.kind == "softmax_functional":
            return F.softmax(logits, dim=1)
        if self.kind == "log_softmax_functional":
            return torch.log_softmax(logits, dim=1)
        raise AssertionError(self.kind)


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def test_modeloutput_with_callable_target_fullgrad_is_complete() -> None:
    model = Wrapped("modeloutput")
    seen: list[type] = []

    def target(out: Any) -> torch.Tensor:
        seen.append(type(out))
        return out.logits[:, 2] - out.logits[:, 0]

    fullgrad = FullGrad(model, im_size=(3, 8, 8))  # construction check reads .logits (arg-max)
    maps = fullgrad.saliency(_x(), target)
    assert maps.shape == (3, 1, 8, 8)
    assert fullgrad.last_relative_error is not None and float(fullgrad.last_relative_error.max()) < 1e-10
    assert fullgrad.checkCompleteness(target=target) < 1e-10
    assert fullgrad.check_completeness(_x(), target=target) < 1e-10
    assert seen and all(kind is ClassifierOutput for kind in seen)
    result = completeness(fullgrad, _x(), target)
    assert float(result.relative_error.max()) < 1e-10
    with torch.no_grad():
        expected = target(model(_x()))
    torch.testing.assert_close(result.expected, expected)


def test_callable_only_output_defers_the_construction_check_to_the_callable() -> None:
    model = Wrapped("tuple")  # no logits entry: class targets cannot be resolved
    fullgrad = FullGrad(model, im_size=(3, 8, 8))  # does not raise: checked at the first call
    with pytest.raises(TargetError, match=r"no `logits` entry.*callable"):
        fullgrad.saliency(_x())
    fullgrad.saliency(_x(), lambda out: out[0][:, 1])
    assert float(fullgrad.last_relative_error.max()) < 1e-10  # type: ignore[union-attr]
    with pytest.raises(TargetError, match="callable"):
        fullgrad.checkCompleteness()


@pytest.mark.parametrize("kind", ["modeloutput", "dict", "namedtuple"])
def test_logits_entry_is_understood_by_every_explainer(kind: str) -> None:
    model, reference = Wrapped(kind), trunk()
    reference.load_state_dict(model.net.state_dict())
    x = _x()
    for make in (
        Gradient,
        lambda m: SmoothGrad(m, n_samples=3),
        lambda m: FullGrad(m, im_size=(3, 8, 8)),
        SimpleFullGrad,
    ):
        ours, theirs = make(model), make(reference)
        torch.testing.assert_close(ours.saliency(x), theirs.saliency(x))
        assert count_hooks(model) == 0
    cam_ours, cam_ref = GradCAM(model, layer=model.net[4]), GradCAM(reference, layer=reference[4])
    torch.testing.assert_close(cam_ours.saliency(x), cam_ref.saliency(x))
    ig_ours = IntegratedGradients(model).attribute(x, n_steps=8)
    ig_ref = IntegratedGradients(reference).attribute(x, n_steps=8)
    torch.testing.assert_close(ig_ours, ig_ref)
    maps = Gradient(reference).saliency(x)
    a = deletion(model, x, maps, step=16)
    b = deletion(reference, x, maps, step=16)
    torch.testing.assert_close(a.auc, b.auc)


def test_output_without_logits_gives_a_clear_error() -> None:
    with pytest.raises(TargetError, match=r"returned a tuple with no `logits` entry.*callable"):
        Gradient(Wrapped("tuple")).attribute(_x())
    model = Wrapped("dict")
    model.kind = "dict"

    class NoLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"scores": x.flatten(1)}

    with pytest.raises(TargetError, match=r"dict \(keys: scores\) with no `logits`"):
        Gradient(NoLogits()).attribute(_x())


# -- softmax heads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("head", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1), nn.Sigmoid()])
def test_softmax_head_explains_the_logits(head: nn.Module) -> None:
    logits_model = trunk()
    head_model = nn.Sequential(trunk(), head).eval()
    head_model[0].load_state_dict(logits_model.state_dict())
    x = _x()
    fullgrad = FullGrad(head_model, im_size=(3, 8, 8))  # complete: the logits are decomposed
    torch.testing.assert_close(fullgrad.saliency(x, 1), FullGrad(logits_model).saliency(x, 1))
    assert float(fullgrad.last_relative_error.max()) < 1e-10  # type: ignore[union-attr]
    torch.testing.assert_close(
        IntegratedGradients(head_model).attribute(x, 2, n_steps=16),
        IntegratedGradients(logits_model).attribute(x, 2, n_steps=16),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        Gradient(head_model).attribute(x), Gradient(logits_model).attribute(x), rtol=0, atol=0
    )
    torch.testing.assert_close(
        SmoothGrad(head_model, n_samples=2).attribute(x), SmoothGrad(logits_model, n_samples=2).attribute(x)
    )
    torch.testing.assert_close(
        completeness(fullgrad, x).relative_error, completeness(FullGrad(logits_model), x).relative_error
    )
    # opting out explains the probabilities: different numbers
    probabilities = Gradient(head_model, scores_from="output").attribute(x, 2)
    assert not torch.allclose(probabilities, Gradient(logits_model).attribute(x, 2))
    assert count_hooks(head_model) == 0


@pytest.mark.parametrize(
    ("kind", "name"), [("softmax_functional", "softmax"), ("log_softmax_functional", "log-softmax")]
)
def test_functional_softmax_is_refused_with_the_fix(kind: str, name: str) -> None:
    model = Wrapped(kind)
    for explainer in (Gradient(model), IntegratedGradients(model), FullGrad(model)):
        with pytest.raises(
            ProbabilityOutputError, match=rf"{name} probabilities.*return the logits.*scores_from='output'"
        ):
            explainer.saliency(_x())
    assert count_hooks(model) == 0
    with pytest.raises(ProbabilityOutputError):
        FullGrad(model, im_size=(3, 8, 8))
    assert Gradient(model, scores_from="output").attribute(_x()).shape == (3, 3, 8, 8)


def test_softmax_module_not_at_the_end_is_not_looked_through() -> None:
    class AttentionLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = trunk()
            self.softmax = nn.Softmax(dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.net(x)
            return logits * self.softmax(logits)  # a softmax inside, not the output

    model = AttentionLike().eval()
    x = _x()
    torch.testing.assert_close(model_output(model, x), model(x))


def test_probability_detection_does_not_fire_on_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(8, 10, generator=generator) * 3
        assert probability_kind(logits) is None
        assert probability_kind(logits.softmax(1)) == "softmax"
        assert probability_kind(logits.log_softmax(1)) == "log-softmax"
    assert probability_kind(torch.rand(4, 1)) is None  # one output: cannot tell, never refused
    with pytest.raises(ValueError, match="scores_from"):
        Gradient(trunk(), scores_from="probs")


def test_deletion_with_a_probability_model() -> None:
    model = Wrapped("softmax_functional")
    x = _x()
    maps = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProbabilityOutputError):
        deletion(model, x, maps, step=16)
    as_is = deletion(model, x, maps, step=16, scores_from="output", score="logit")
    reference = deletion(model.net, x, maps, step=16)  # softmax of the logits: the same probabilities
    torch.testing.assert_close(as_is.auc, reference.auc)
