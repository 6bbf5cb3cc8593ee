"""Update ratios against a float64 brute force: the chunked CPU pass, the foreach group, channels-last
and non-contiguous weights, zero weights (absolute update) and a snapshot used up (``keep=False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bbdecoder.monitor.cpu_reductions import CHUNK
from bbdecoder.monitor.weights import UpdateRatios

pytestmark = pytest.mark.usefixtures("cpu_passes")  # each test with the fused kernels and with NumPy


def _weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(128, 9216, generator=gen),  # chunked, with a tail
        torch.zeros(10),  # zero-initialised bias: absolute update
        torch.randn(64, 32, 3, 3, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(96, 48, 7, 7, generator=gen).to(memory_format=torch.channels_last),  # chunked
        torch.randn(400, 700, generator=gen).t(),  # non-contiguous: grouped
        torch.randn(CHUNK + 3, generator=gen, dtype=torch.float64),
    ]


def _expected(before: list[torch.Tensor], after: list[torch.Tensor]) -> np.ndarray:
    out = []
    for b, a in zip(before, after, strict=True):
        delta, norm = float((a.double() - b.double()).norm()), float(b.double().norm())
        out.append(delta / norm if norm > 0 else delta)
    return np.array(out)


def _update(weights: list[torch.Tensor], k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for w in weights:
            w.add_(1e-3 * torch.randn(w.shape, generator=gen, dtype=w.dtype))


@pytest.mark.parametrize(("keep", "threads"), [(True, 1), (False, 1), (True, 3)])
def test_ratios_over_steps_equal_float64(keep: bool, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # more than 1: whole tensors
    weights = _weights()
    tracker = UpdateRatios()
    tracker.remember(weights)
    for k in range(3):
        before = [w.clone() for w in weights]
        _update(weights, k)
        got = tracker.measure(weights, keep=keep).numpy()
        np.testing.assert_allclose(got, _expected(before, weights), rtol=1e-4)
        assert np.isfinite(got).all() and got[1] > 0
        if not keep:
            assert not tracker.ready
            tracker.remember(weights)
    for w, layout in zip(weights, _weights(), strict=True):
        assert w.stride() == layout.stride()  # the weights were only read


def test_snapshot_follows_the_weights_without_new_allocations() -> None:
    weights = _weights()
    tracker = UpdateRatios()
    tracker.remember(weights)
    assert tracker._snapshot is not None
    pointers = [s.data_ptr() for s in tracker._snapshot]
    _update(weights, 7)
    tracker.measure(weights)
    assert [s.data_ptr() for s in tracker._snapshot] == pointers
    for s, w in zip(tracker._snapshot, weights, strict=True):
        torch.testing.assert_close(s, w, rtol=0, atol=0)
