"""Element counts for the saturation statistics: the NumPy path through the reused mask buffer
equals torch's boolean oracle for every layout (pieces, channels-last, strided, bfloat16, float64,
NaN, -0.0, empty), and the watcher keeps one buffer as large as its largest output."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from bbdecoder.monitor import Analyzer, element_counts
from bbdecoder.monitor.activations import saturation_count, saturation_test
from bbdecoder.monitor.element_counts import MaskBuffer, count

_OPS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le}


def _layouts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, 6, 7, generator=g)
    base[0, 0, 0, :3] = 0.25  # ties with a bound
    base[1, 1, 1, :2] = float("nan")
    base[2, 2, 2, :2] = -0.0
    return [
        base,
        base.contiguous(memory_format=torch.channels_last),  # dense, not contiguous: NumPy path
        base[:, 1],  # strided: torch path
        base.double(),
        base.bfloat16(),  # torch path
        torch.relu(base),
        torch.empty(0, 3),
    ]


@pytest.mark.parametrize("chunk", [1 << 24, 50])
@pytest.mark.parametrize("op", sorted(_OPS))
@pytest.mark.parametrize("bound", [0.0, 0.25, -0.999])
def test_count_equals_the_boolean_sum(monkeypatch, chunk, op, bound) -> None:
    monkeypatch.setattr(element_counts, "CHUNK", chunk)  # 50: every output in several pieces
    buffer = MaskBuffer()
    for y in _layouts():
        want = int(_OPS[op](y, bound).sum())
        got = count(y, op, bound, buffer)
        assert int(got) == want == int(count(y, op, bound)), (op, bound, y.shape, y.dtype)
    assert buffer.nbytes <= chunk


@pytest.mark.parametrize(
    "module",
    [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5), nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh()],
)
def test_saturation_count_equals_the_boolean_rule_with_nan_and_ties(module) -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 3, 40) * 8
    x[0, 0, :4] = float("nan")
    y = module(x)
    y[1, 1, :3] = 1 - 1e-3  # at the sigmoid / tanh threshold: not saturated
    y[1, 2, :3] = -0.0
    count_fn, mask = saturation_count(module, 1e-3), saturation_test(module, 1e-3)
    assert count_fn is not None and mask is not None
    want = int(mask(y).sum())
    assert 0 < want < y.numel()
    assert int(count_fn(y, MaskBuffer())) == want == int(count_fn(y, None))


def test_the_watcher_reuses_one_buffer_as_large_as_the_largest_output(tmp_path, cpu_passes: str) -> None:
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 1))
    x = torch.randn(32, 8)
    with Analyzer(model, tmp_path, activations=True) as an:
        held = []
        for _ in range(3):
            an.forward_propagation(x).sum().backward()
            an.step()
            masks = an._activations.masks
            held.append((masks.nbytes, masks._mask.ctypes.data))
        if cpu_passes == "fused":  # the probes' fused kernel counts without any buffer
            assert [n for n, _ in held] == [0, 0, 0]
        else:
            assert held == [(32 * 64, held[0][1])] * 3
