"""The monitor's per-step and per-epoch statistics against float64 oracles, on values whose mean is
far above their spread (where a one-pass or float32 formula cancels) and with non-finite steps."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import torch

from bbdecoder.monitor import cpu_reductions, grad_stats
from bbdecoder.monitor.epochs import EpochAccumulator
from bbdecoder.monitor.grad_stats import GRAD_STATS, grad_statistics

pytestmark = pytest.mark.usefixtures("cpu_passes")  # each test with the fused kernels and with NumPy


def test_the_fused_kernels_build_where_a_compiler_is() -> None:
    # the extension is optional, so a broken build would silently fall back to NumPy
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler here: the NumPy passes are the expected ones")
    try:  # whatever the path this test's parameter selects, the extension must be importable
        from bbdecoder.monitor import _fused  # noqa: F401
    except ImportError as error:
        raise AssertionError("the C extension did not build: pip install -e . and read its log") from error


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
    # the rows in another order take the general update: the same aggregates
    reordered = EpochAccumulator(2, 3)
    for values in steps:
        reordered.update(np.array([1, 0]), values[::-1])
    for got, want in zip(reordered.result(), (mean, var, count), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def _oracle(g: torch.Tensor) -> list[float]:
    x = g.detach().double().reshape(-1)
    return [
        float(x.mean()),
        float(x.abs().mean()),
        float(x.abs().max()),
        float(x.var(correction=0)),
        float(x.abs().sum()),
        float(x.norm()),
    ]


def _cpu_grads() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    chunk = cpu_reductions.CHUNK
    return [
        1e-3 * torch.randn(128, 9216, generator=gen),  # several chunks and a tail: the one-pass path
        torch.randn(7, generator=gen),  # small ones between large ones: order kept
        0.5 + 0.1 * torch.rand(chunk + 5, generator=gen),  # mean far above spread: exact two-pass
        torch.randn(chunk * 2, generator=gen, dtype=torch.float64),
        1e20 * torch.randn(40_000, generator=gen),  # squares overflow float32: scaled two-pass
        1e-20 * torch.randn(40_000, generator=gen),  # squares underflow
        torch.zeros(50_000),
        torch.randn(64, 64, generator=gen).to(torch.bfloat16),
        torch.randn(3, 1, 1, generator=gen),
        torch.randn(64, 32, 3, 3, generator=gen).to(memory_format=torch.channels_last),  # memory order
        torch.randn(300, 700, generator=gen).t(),  # not dense in memory order: reduced from a copy
        torch.randn(40, 30, generator=gen).t(),  # a small one not dense in memory order
        torch.randn(5, 6, generator=gen, requires_grad=True),  # a create_graph=True gradient
    ]


@pytest.mark.parametrize("threads", [1, 3])  # chunks with one thread, whole tensors with more
def test_cpu_one_pass_statistics_equal_float64_with_the_stated_bound(threads: int) -> None:
    grads = _cpu_grads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = grad_statistics(grads).numpy()
    finally:
        torch.set_num_threads(before)
    expected = np.array([_oracle(g) for g in grads])
    # relative error bound of the docstring: 3 * CONDITION * delta with delta <= ~1e-6 (float32
    # cascade sums of one chunk); float64 inputs are exact to ~1e-12
    np.testing.assert_allclose(stats, expected, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(stats[:, GRAD_STATS.index("max_abs")], expected[:, 2])  # exact


def test_dense_gradients_take_one_fused_call_and_equal_float64(
    cpu_passes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the gradients of _cpu_grads that a training step makes, all dense float32/float64: with the
    # fused kernels one call and no general path; the redo rule still applies to its rows
    grads = [g for g in _cpu_grads() if g.dtype != torch.bfloat16 and not g.requires_grad]
    grads += [torch.randn(40, 30).t().contiguous().t()]  # transposed but dense: the kernel reads it
    general: list[int] = []
    stats = grad_stats.GradStatistics()
    cpu = stats._cpu
    monkeypatch.setattr(stats, "_cpu", lambda gs, known: general.append(len(gs)) or cpu(gs, known))
    got = stats(grads).numpy()
    assert general == ([] if cpu_passes == "fused" else [len(grads)])
    expected = np.array([_oracle(g) for g in grads])
    # float64 sums: the variance of 0.5 + 0.1 U (E[g^2] = 365 var) is off by ~6e-12 (FUSED_CONDITION)
    np.testing.assert_allclose(got, expected, rtol=1e-10 if cpu_passes == "fused" else 1e-5, atol=0)
    np.testing.assert_array_equal(got[:, GRAD_STATS.index("max_abs")], expected[:, 2])


def test_gradients_the_kernels_refuse_take_the_general_path(cpu_passes: str) -> None:
    gen = torch.Generator().manual_seed(4)
    refused = [
        torch.randn(300, generator=gen).to(torch.float16),  # widened
        torch.randn(30, 40, generator=gen)[:, ::2],  # a strided view
        torch.empty(0),  # NaN statistics
        torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.tensor([2.0, -3.0]), (8,)),
    ]
    for bad in refused:
        grads = [torch.randn(5000, generator=gen), bad]
        got = grad_statistics(grads).numpy()
        np.testing.assert_allclose(got[0], _oracle(grads[0]), rtol=1e-5)
        if bad.numel():
            np.testing.assert_allclose(got[1], _oracle(bad.to_dense() if bad.is_sparse else bad), rtol=1e-5)
        else:
            assert np.isnan(got[1]).all()


def test_cpu_one_pass_path_is_the_one_taken_on_ordinary_gradients(monkeypatch: Any) -> None:
    gen = torch.Generator().manual_seed(2)
    ordinary = [1e-3 * torch.randn(300_000, generator=gen), torch.randn(40_000, generator=gen) - 0.5]
    stats = grad_stats.GradStatistics()
    two_pass: list[int] = []
    in_float64: list[int] = []
    exact, small = grad_stats.GradStatistics()._large, grad_stats.small_statistics
    monkeypatch.setattr(stats, "_large", lambda gs: two_pass.append(len(gs)) or exact(gs))
    monkeypatch.setattr(grad_stats, "small_statistics", lambda gs: in_float64.append(len(gs)) or small(gs))
    got = stats(ordinary).numpy()
    assert two_pass == [] and in_float64 == []  # no tensor needed an exact redo
    np.testing.assert_allclose(got, np.array([_oracle(g) for g in ordinary]), rtol=1e-5)
    # E[g^2] = 1e6 var: the one-pass formula would cancel, so both are redone exactly, the one up
    # to a chunk in float64, the larger one by the two-pass path
    large = 3 * cpu_reductions.CHUNK + 7
    offset = [1000 + torch.randn(40_000, generator=gen), 1000 + torch.randn(large, generator=gen)]
    got = stats(offset).numpy()
    assert two_pass == [1] and in_float64 == [1]
    np.testing.assert_allclose(got, np.array([_oracle(g) for g in offset]), rtol=1e-5)


def test_cpu_statistics_of_nonfinite_gradients_flag_max_abs() -> None:
    gen = torch.Generator().manual_seed(3)
    with_nan, with_inf = torch.randn(100_000, generator=gen), torch.randn(100_000, generator=gen)
    with_nan[70_000] = float("nan")
    with_inf[3] = float("-inf")
    small = torch.randn(10, generator=gen)
    small[2] = float("nan")
    stats = grad_statistics([with_nan, with_inf, small, torch.randn(5, generator=gen)]).numpy()
    max_abs = stats[:, GRAD_STATS.index("max_abs")]
    assert np.isnan(max_abs[0]) and max_abs[1] == np.inf and np.isnan(max_abs[2])
    assert np.isfinite(stats[3]).all()


@pytest.mark.parametrize("size", [10, 100_000])  # the small rows together, a large one alone
def test_nonfinite_gradients_get_the_norms_float64_gives(size: int) -> None:
    """NaN, +-Inf and both: ``l1``, ``max_abs`` and ``l2`` are what float64 ``abs().sum()``,
    ``abs().max()`` and ``norm()`` give (an Inf gradient's L2 is Inf, not the NaN of
    ``sqrt(n var + n mean^2)``); the CUDA and CPU paths, the exact redo and the Keras host path
    share these rows."""
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(size, generator=gen) for _ in range(4)]
    grads[0][1] = float("nan")
    grads[1][2] = float("inf")
    grads[2][3], grads[2][4] = float("-inf"), float("inf")
    grads[3][0], grads[3][5] = float("inf"), float("nan")
    host = grad_statistics(grads).double().numpy()
    device = grad_stats.GradStatistics()._device(grads).numpy()  # the CUDA path's torch ops, on CPU
    for stats in (host, device):
        for row, g in zip(stats, grads, strict=True):
            g64 = g.double()
            for name, want in (("l1", g64.abs().sum()), ("max_abs", g64.abs().max()), ("l2", g64.norm())):
                got = row[GRAD_STATS.index(name)]
                assert got == float(want) or (np.isnan(got) and want.isnan()), (name, got, float(want))
