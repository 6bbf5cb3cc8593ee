"""The shared zoo's promises: deterministic per seed, the documented shapes, twins with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from . import zoo


@pytest.mark.parametrize("name", sorted({**zoo.ZOO, **zoo.VIT_ZOO}))
@pytest.mark.parametrize("float64", [False, True])
def test_builder_shape_dtype_seed(name: str, float64: bool) -> None:
    build = {**zoo.ZOO, **zoo.VIT_ZOO}[name]
    model = build(0, float64=float64)
    x = zoo.zoo_input(3, float64=float64)
    assert not model.training and all(not m.training for m in model.modules())
    out = zoo.logits_of(model(x))
    assert out.shape == (3, zoo.NUM_CLASSES)
    assert out.dtype == (torch.float64 if float64 else torch.float32)
    same = build(0, float64=float64).state_dict()
    other = build(1, float64=float64).state_dict()
    state = model.state_dict()
    assert state.keys() == same.keys() == other.keys()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], other[k]) for k in state if state[k].is_floating_point())


def test_softmax_and_model_output_wrap_plain_cnn() -> None:
    x = zoo.zoo_input(2, float64=True)
    logits = zoo.plain_cnn(3, float64=True)(x)
    probs = zoo.softmax_head(3, float64=True)(x)
    torch.testing.assert_close(probs, logits.softmax(1), rtol=0, atol=1e-12)
    output = zoo.model_output(3, float64=True)(x)
    assert isinstance(output, zoo.ClassifierOutput) and list(output) == ["logits", "hidden_states"]
    torch.testing.assert_close(output.logits, logits, rtol=0, atol=0)


def test_fused_bn_act_equals_bn_then_relu() -> None:
    model = zoo.fused_bn_act(0, float64=True)
    fused = model[1]
    assert isinstance(fused, nn.BatchNorm2d) and list(dict(fused.named_children())) == ["drop", "act"]
    plain = nn.BatchNorm2d(zoo.WIDTH).double().eval()
    plain.load_state_dict(fused.state_dict())
    a = torch.randn(2, zoo.WIDTH, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fused(a), torch.relu(plain(a)), rtol=0, atol=0)
    bias = plain.bias - plain.running_mean * plain.weight / torch.sqrt(plain.running_var + plain.eps)
    assert bias.abs().min() > 0  # randomised statistics: FullGrad sees a non-zero effective bias


def test_zoo_input_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    zoo.zoo_input(4, seed=9)
    assert torch.equal(torch.rand(1), expected)


def test_builders_leave_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    for build in [*zoo.ZOO.values(), *zoo.VIT_ZOO.values()]:
        build(7)
    assert torch.equal(torch.rand(1), expected)
