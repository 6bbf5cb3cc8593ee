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
    assert probe.fused._of == ()  # the kernel never ran


def test_the_kernel_counts_each_saturated_value_once_against_a_brute_force() -> None:
    y = torch.tensor([[-1.0, 0.0, -0.0, 6.0, 6.5, 3.0, float("nan"), 6.0]])
    probe = _run(nn.ReLU6(), -1, [y], True)  # saturated: <= 0 or >= 6
    assert float(probe.saturated) == 6 and float(probe.total) == 8
    np.testing.assert_array_equal(probe.max.numpy(), y[0].numpy())


def test_state_on_another_device_is_left_to_the_torch_path() -> None:
    probe = ActivationProbe(nn.ReLU(), threshold=0.0, eps=1e-3, dim=1, dead=True)
    probe.allocate(6, torch.device("meta"))  # as a model moved off the device its state was made on
    assert probe.fused.update(probe, torch.relu(torch.randn(2, 6, 3))) is False
    assert probe.fused._of == ()
