"""The fused kernels split over torch's intra-op threads (monitor/csrc/threads.c, blocks.c): the
same bits with any number of threads (partial sums per block, added in block order), on the
OpenMP runtime torch itself loaded (no thread started beside its pool), for every pass: moments,
statistics with known rows, update norms (keep, used up, into spares) and the probes' update."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from bbdecoder.monitor import cpu_reductions
from bbdecoder.monitor.moment_rows import _FUSED_BOUNDS

fused = pytest.importorskip("bbdecoder.monitor._fused", reason="the optional C extension is not built here")

BLOCK = 65_536  # FUSED_BLOCK in fused.h
SIZES = [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 40_000, 300_001]
THREADS = [2, 3, 4, 7]


def _arrays(seed: int = 0) -> list[np.ndarray]:
    # magnitudes over 16 decades, so that no float64 sum is exact and the order of the additions
    # shows in the bits (float32 values of one binade would add up exactly in any order)
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(SIZES):
        dtype = np.float64 if k % 3 == 2 else np.float32  # one call holds both dtypes
        out.append((rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)).astype(dtype))
    return out


def test_the_passes_run_on_torchs_openmp_runtime_where_torch_has_one() -> None:
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info() or sys.platform == "win32":
        pytest.skip("torch here does not run its intra-op threads on OpenMP")
    assert cpu_reductions.fused_threads()


def test_moments_are_the_same_bits_with_any_number_of_threads() -> None:
    arrays = _arrays()
    one = fused.moments(arrays, 1)
    for threads in THREADS:
        assert fused.moments(arrays, threads) == one
    for (_, l1, top, squares), a in zip(one, arrays, strict=True):
        wide = np.abs(a.astype(np.float64))
        assert l1 == pytest.approx(wide.sum(), rel=1e-12) and top == (wide.max() if a.size else 0.0)
        assert squares == pytest.approx((wide * wide).sum(), rel=1e-12)


def test_statistics_are_the_same_bits_with_any_number_of_threads_and_keep_the_known_rows() -> None:
    arrays = _arrays(1)
    known = [None] * len(arrays)
    known[4] = (1.0, 2.0, 3.0, 4.0)  # taken as given: no block of it is read
    one = fused.statistics(arrays, known, *_FUSED_BOUNDS, 1)
    rows = np.frombuffer(one[0]).reshape(len(arrays), 6)
    assert rows[4].tolist() == pytest.approx(
        [1.0 / BLOCK, 2.0 / BLOCK, 3.0, 4.0 / BLOCK - BLOCK**-2, 2.0, 2.0]
    )
    for threads in THREADS:
        assert fused.statistics(arrays, known, *_FUSED_BOUNDS, threads) == one


@pytest.mark.parametrize(("keep", "spare"), [(True, False), (False, False), (True, True)])
def test_update_norms_and_their_writes_are_the_same_bits_with_any_number_of_threads(
    keep: bool, spare: bool
) -> None:
    weights = _arrays(2)
    rng = np.random.default_rng(3)
    before = [(w + rng.standard_normal(w.size).astype(w.dtype) * 1e-2).astype(w.dtype) for w in weights]

    def run(threads: int) -> tuple[list[tuple[float, float]], list[np.ndarray]]:
        snapshots = [b.copy() for b in before]
        into = [np.full_like(w, np.nan) for w in weights] if spare else None
        norms = fused.update_norms(weights, snapshots, keep, into, threads)
        return norms, into if into is not None else snapshots

    norms, written = run(1)
    for w, b, t in zip(weights, before, written, strict=True):  # what the one thread wrote
        np.testing.assert_array_equal(t, w if keep else b - w)
    for threads in THREADS:
        got, wrote = run(threads)
        assert got == norms
        for a, b in zip(wrote, written, strict=True):
            assert a.tobytes() == b.tobytes()


LAYOUTS = [
    ((32, 16, 24, 24), 16, 576),  # a convolution's (N, C, H, W): one unit per sample
    ((5000, 48), 48, 1),  # (N * L, D) channels last: units of 1,024 rows, the last one short
    ((1001, 1024), 1024, 1),  # wide: units of 128 rows, the last of 105 (four rows at a time, one left)
    ((7, 3, 2), 3, 2),  # inner of 2
    ((3000,), 3000, 1),  # one channel per element
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "channels", "inner"), LAYOUTS)
def test_the_probe_update_is_the_same_state_with_any_number_of_threads(
    shape: tuple[int, ...], channels: int, inner: int, dtype: type
) -> None:
    rng = np.random.default_rng(4)
    outputs = []
    for k in range(3):
        y = np.tanh(3 * rng.standard_normal(shape)).astype(dtype)
        flat = y.reshape(-1)
        flat[k::101] = 0.99  # on the bound: not saturated
        if k == 1:
            flat[flat.size // 2] = np.nan  # a channel's maximum becomes NaN in whichever part holds it
        outputs.append(y)

    def run(threads: int) -> list[bytes]:  # the state after each forward (channel_var is NaN after a NaN)
        maxima = [np.full(channels, -np.inf, np.float32)]
        scalars = [np.zeros((), np.float64) for _ in range(4)]
        states = []
        for y in outputs:
            fused.probe_update(y, channels, inner, [(0, -0.99), (2, 0.99)], maxima, scalars, threads)
            states += [a.tobytes() for a in maxima + scalars]
        return states

    one = run(1)
    saturated = sum(int(((y < -0.99) | (y > 0.99)).sum()) for y in outputs)  # NaN compares false
    assert np.frombuffer(one[-4])[0] == saturated
    for threads in THREADS:
        assert run(threads) == one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the threads in /proc")
def test_no_thread_is_started_beside_torchs_pool() -> None:
    if not cpu_reductions.fused_threads():
        pytest.skip("no OpenMP runtime of torch's found")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(1 << 22).abs_().sum()  # a parallel op: torch's pool of two
        before = len(os.listdir("/proc/self/task"))
        arrays = _arrays()
        fused.moments(arrays, 2)
        fused.update_norms(arrays, [a.copy() for a in arrays], True, None, 2)
        assert len(os.listdir("/proc/self/task")) <= before  # other tests' threads may have ended
    finally:
        torch.set_num_threads(threads)
