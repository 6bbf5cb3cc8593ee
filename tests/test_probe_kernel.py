"""The activation probes' fused kernel (monitor/probe_kernel.py) against the probes' torch path:
the same state after the same outputs, for every layout it takes (channels first and last,
channels-last memory, 1-D, float64), NaN and values on the saturation bounds; the layouts it does
not take keep the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bbdecoder.monitor.activations import ActivationProbe
from bbdecoder.monitor.element_counts import MaskBuffer
from bbdecoder.monitor.probe_kernel import channel_layout

pytest.importorskip("bbdecoder.monitor._fused", reason="the optional C extension is not built here")


def _outputs(shape: tuple[int, ...], module: nn.Module, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for k in range(3):
        y = module(4 * torch.randn(shape, generator=gen, dtype=dtype))
        flat = y.view(-1)
        flat[k::97] = 1 - 1e-3  # on the sigmoid / tanh bound: not saturated
        flat[5 + k :: 89] = -0.0
        if k == 1:
            flat[7] = float("nan")  # its channel's maximum becomes NaN, never counted
        outs.append(y)
    return outs


def _state(probe: ActivationProbe) -> list[np.ndarray]:
    names = ("max", "saturated", "total", "channel_var", "forwards")
    return [getattr(probe, n).numpy().copy() for n in names]


def _run(module: nn.Module, dim: int, outputs: list[torch.Tensor], fused: bool) -> ActivationProbe:
    probe = ActivationProbe(module, threshold=0.0, eps=1e-3, dim=dim, dead=True)
    for y in outputs:
        probe.update(y, MaskBuffer() if fused else None)  # no buffer: the torch path
    return probe


CASES = [
    ((8, 6, 5, 7), 1, torch.float32, "contiguous"),  # a convolution's (N, C, H, W)
    ((4, 9, 16), -1, torch.float32, "contiguous"),  # a transformer's (N, L, D)
    ((50,), 0, torch.float32, "contiguous"),  # one unit per element
    ((8, 6, 5, 7), 1, torch.float64, "contiguous"),
    ((8, 6, 5, 7), 1, torch.float32, "channels_last"),
    ((6, 5, 4), 1, torch.float32, "contiguous"),  # inner of 4: the block loop
    ((2, 3, 40, 30), 1, torch.float32, "contiguous"),  # inner of 1200: more than one piece
    ((2, 3, 41, 29), 1, torch.float64, "contiguous"),
    ((3, 7, 1024), -1, torch.float32, "contiguous"),  # a wide (N, L, D): four rows at a time, one left
]


@pytest.mark.parametrize(
    "module", [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.ReLU6(), nn.Hardsigmoid(), nn.GELU()]
)
@pytest.mark.parametrize(("shape", "dim", "dtype", "layout"), CASES)
def test_the_kernel_leaves_the_state_the_torch_path_does(
    module: nn.Module, shape: tuple[int, ...], dim: int, dtype: torch.dtype, layout: str
) -> None:
    outputs = _outputs(shape, module, dtype, seed=len(shape))
    if layout == "channels_last":
        outputs = [y.contiguous(memory_format=torch.channels_last) for y in outputs]
    assert channel_layout(outputs[0], dim) is not None  # the kernel takes it
    ours, theirs = _state(_run(module, dim, outputs, True)), _state(_run(module, dim, outputs, False))
    np.testing.assert_array_equal(ours[0], theirs[0])  # maxima, NaN where NaN
    assert np.isnan(ours[0]).sum() == 1  # the channel of the NaN
    np.testing.assert_array_equal(ours[1:3], theirs[1:3])  # saturated, total: exact counts
    np.testing.assert_allclose(ours[3], theirs[3], rtol=2e-6)  # float64 against float32 means
    assert ours[4] == theirs[4] == len(outputs)


def test_strided_outputs_take_the_torch_path() -> None:
    y = torch.relu(torch.randn(8, 6, 10))[:, :, ::2]
    assert channel_layout(y, 1) is None
    probe = _run(nn.ReLU(), 1, [y], True)
    np.testing.assert_array_equal(_state(probe)[0], _state(_run(nn.ReLU(), 1, [y], False))[0])
    assert probe.fused._maxima == []  # the kernel never ran (its views were never made)


def test_the_kernel_counts_each_saturated_value_once_against_a_brute_force() -> None:
    y = torch.tensor([[-1.0, 0.0, -0.0, 6.0, 6.5, 3.0, float("nan"), 6.0]])
    probe = _run(nn.ReLU6(), -1, [y], True)  # saturated: <= 0 or >= 6
    assert float(probe.saturated) == 6 and float(probe.total) == 8
    np.testing.assert_array_equal(probe.max.numpy(), y[0].numpy())


def test_state_on_another_device_is_left_to_the_torch_path() -> None:
    probe = ActivationProbe(nn.ReLU(), threshold=0.0, eps=1e-3, dim=1, dead=True)
    probe.allocate(6, torch.device("meta"))  # as a model moved off the device its state was made on
    assert probe.fused.update(probe, torch.relu(torch.randn(2, 6, 3))) is False
    assert probe.fused._maxima == []


RULE_CHOICES = [[], [(0, 0.0)], [(1, 0.0)], [(2, 0.5)], [(3, 0.5)], [(0, -0.5), (2, 0.5)],
                [(1, -0.5), (3, 0.5)], [(0, -0.5), (3, 0.5)], [(1, -0.5), (2, 0.5)]]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rules", RULE_CHOICES)
def test_every_rule_variant_counts_as_a_brute_force_loop(rules: list[tuple[int, float]], dtype: type) -> None:
    from bbdecoder.monitor import _fused

    rng = np.random.default_rng(len(rules))
    y = rng.choice(
        np.array([-1.0, -0.5, -0.25, 0.0, -0.0, 0.25, 0.5, 1.0, np.nan]), size=(3, 4, 1100)
    ).astype(dtype)
    maxima = [np.full(4, -np.inf, np.float32)]
    scalars = [np.zeros((), np.float64) for _ in range(4)]
    _fused.probe_update(y, 4, 1100, rules, maxima, scalars, 1)
    tests = {0: lambda v, b: v < b, 1: lambda v, b: v <= b, 2: lambda v, b: v > b, 3: lambda v, b: v >= b}
    expected = sum(1 for v in y.reshape(-1) if any(tests[op](v, bound) for op, bound in rules))  # NaN: never
    assert scalars[0] == expected and scalars[1] == (y.size if rules else 0)
    np.testing.assert_array_equal(maxima[0], np.full(4, np.nan, np.float32))  # a NaN in every channel


@pytest.mark.parametrize("channels_last", [False, True])
def test_infinities_of_both_signs_without_a_nan_give_an_infinite_maximum(channels_last: bool) -> None:
    y = torch.relu(torch.randn(2, 3, 1500))
    y[0, 1, 7], y[1, 1, 1400] = float("inf"), -float("inf")  # the channel's sum is NaN, no value is
    y[1, 2, 3] = float("nan")
    dim = 1
    if channels_last:  # (N, L, D): the channels along the last dim
        y, dim = y.transpose(1, 2).contiguous(), -1
    ours, theirs = _state(_run(nn.ReLU(), dim, [y], True)), _state(_run(nn.ReLU(), dim, [y], False))
    np.testing.assert_array_equal(ours[0], theirs[0])
    assert ours[0][1] == float("inf") and np.isnan(ours[0][2]) and np.isfinite(ours[0][0])


def test_outputs_that_change_shape_and_layout_keep_the_state_the_torch_path_does() -> None:
    gen = torch.Generator().manual_seed(3)
    outputs = []
    for batch in (4, 3, 4, 2):  # a last batch smaller, then the same shape in channels-last memory
        y = torch.relu(torch.randn(batch, 5, 6, 7, generator=gen))
        outputs.append(y.contiguous(memory_format=torch.channels_last) if batch == 2 else y)
    outputs.append(outputs[0].clone().contiguous(memory_format=torch.channels_last))
    ours, theirs = _state(_run(nn.ReLU(), 1, outputs, True)), _state(_run(nn.ReLU(), 1, outputs, False))
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1:3], theirs[1:3])
    np.testing.assert_allclose(ours[3], theirs[3], rtol=2e-6)


def test_an_output_in_the_graph_is_read_without_a_no_grad_block_and_left_in_it() -> None:
    x = torch.randn(4, 6, 5, requires_grad=True)
    y = torch.relu(x * 2)  # requires grad, as a layer's output inside a training forward
    probe = _run(nn.ReLU(), 1, [y], True)
    assert probe.fused._maxima != []  # the kernel read it
    assert not probe.max.requires_grad and probe.max.grad_fn is None
    np.testing.assert_array_equal(probe.max.numpy(), y.detach().amax(dim=(0, 2)).numpy())
    y.sum().backward()  # the graph is untouched
    assert x.grad is not None


def test_negative_views_and_tensor_subclasses_take_the_torch_path() -> None:
    class Tagged(torch.Tensor):
        pass

    y = torch.randn(4, 6, 5)
    for out in (torch._neg_view(y), y.as_subclass(Tagged)):
        probe = _run(nn.ReLU(), 1, [out], True)
        assert probe.fused._maxima == []
        np.testing.assert_array_equal(probe.max.numpy(), out.amax(dim=(0, 2)).numpy())


@pytest.mark.parametrize("fused", [True, False])
def test_forwards_inside_torch_func_transforms_are_left_out_without_an_error(fused: bool) -> None:
    probe = _run(nn.ReLU(), 1, [torch.relu(torch.randn(4, 6, 5))], fused)
    before = _state(probe)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        probe.update(y, MaskBuffer() if fused else None)  # as the hook does, inside the transform
        return y.sum()

    torch.func.vmap(forward)(torch.randn(3, 4, 6, 5))
    torch.func.vmap(forward)(torch.randn(3, 4, 7, 5))  # another channel count: no new state either
    torch.func.grad(forward)(torch.randn(4, 6, 5))
    torch.func.grad(forward)(torch.randn(4, 9, 5))
    for ours, theirs in zip(_state(probe), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)
