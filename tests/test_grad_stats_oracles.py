"""The monitor's per-step and per-epoch statistics against float64 oracles, on values whose mean is
far above their spread (where a one-pass or float32 formula cancels) and with non-finite steps."""

from __future__ import annotations

import numpy as np
import torch

from bbdecoder.monitor.grad_stats import GRAD_STATS, EpochAccumulator, grad_statistics


def test_step_statistics_of_offset_gradients_equal_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [1000 + torch.randn(4096, generator=gen), -3 + 1e-3 * torch.randn(64, 9, generator=gen)]
    stats = grad_statistics(grads).double()
    for row, g in zip(stats, grads, strict=True):
        g64 = g.double()
        expected = {
            "mean": g64.mean(),
            "mean_abs": g64.abs().mean(),
            "max_abs": g64.abs().max(),
            "var": g64.var(correction=0),
            "l1": g64.abs().sum(),
            "l2": g64.norm(),
        }
        for name, value in zip(GRAD_STATS, row, strict=True):
            np.testing.assert_allclose(float(value), float(expected[name]), rtol=1e-4, err_msg=name)
    # E[g^2] - E[g]^2 in float32 would be off by orders of magnitude here (about 1 against 1e6)
    assert abs(float(stats[0, GRAD_STATS.index("var")]) - 1.0) < 0.1


def test_epoch_aggregates_equal_float64_and_skip_nonfinite_steps() -> None:
    rng = np.random.default_rng(0)
    steps = 1000 + rng.normal(0, 1e-3, size=(200, 2, 3))  # mean 1000, spread 1e-3 over iterations
    steps[17, 1, 2] = np.nan
    steps[40, 0, 0] = np.inf
    accumulator = EpochAccumulator(2, 3)
    for values in steps:
        accumulator.update(np.array([0, 1]), values)
    mean, var, count = accumulator.result()
    masked = np.ma.masked_invalid(steps)
    np.testing.assert_allclose(count, (~masked.mask).sum(0))
    np.testing.assert_allclose(mean, masked.mean(0).filled(np.nan), rtol=1e-12)
    # float32 accumulation cannot resolve a variance of 1e-6 on a mean of 1000
    np.testing.assert_allclose(var, masked.var(0).filled(np.nan), rtol=1e-6)
    assert np.isfinite(mean).all() and np.isfinite(var).all()
