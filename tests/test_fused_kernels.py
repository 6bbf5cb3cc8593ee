"""The fused C kernels of the monitor's CPU passes (monitor/csrc/) against float64 oracles and
against the NumPy passes they replace: sums, the exact maximum, the snapshot writes of
``update_norms`` (keep, used up, into spares), float64 arrays, NaN/Inf, bad input, the GIL."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bbdecoder.monitor.cpu_reductions import Scratch, numpy_moments, numpy_update_norms
from bbdecoder.monitor.moment_rows import _FUSED_BOUNDS, moment_rows

SIZES = [0, 1, 7, 4097, 65_537, 1_000_003]


fused = pytest.importorskip("bbdecoder.monitor._fused", reason="the optional C extension is not built here")


def _arrays(dtype: type, offset: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(offset + 1e-3 * rng.standard_normal(n)).astype(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_moments_equal_float64_sums_and_the_exact_maximum(dtype: type, offset: float) -> None:
    arrays = _arrays(dtype, offset)
    got = fused.moments(arrays)
    for a, (total, l1, top, squares) in zip(arrays, got, strict=True):
        x = a.astype(np.float64)
        l1_exact = float(np.abs(x).sum())
        # double accumulators: off by the rounding of n additions at most (n * 2^-53 of sum |g|)
        bound = max(a.size, 1) * 2.0**-53 * l1_exact
        assert abs(total - float(x.sum())) <= bound
        assert abs(l1 - l1_exact) <= bound
        assert abs(squares - float((x * x).sum())) <= max(a.size, 1) * 2.0**-53 * float((x * x).sum())
        assert top == (float(np.abs(x).max()) if a.size else 0.0)  # exact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_agree_with_the_numpy_passes(dtype: type) -> None:
    arrays = [a for a in _arrays(dtype) if a.size]
    for ours, theirs in zip(fused.moments(arrays), numpy_moments(arrays, Scratch()), strict=True):
        # NumPy's float32 chunk sums are the coarser ones (~1e-7 of sum |g|, see cpu_reductions)
        assert abs(ours[0] - theirs[0]) <= 1e-6 * theirs[1]
        np.testing.assert_allclose([ours[1], ours[3]], [theirs[1], theirs[3]], rtol=1e-6)
        assert ours[2] == theirs[2]


def test_moments_of_nonfinite_arrays_have_nonfinite_sums() -> None:
    with_nan, with_inf = np.ones(5000, np.float32), np.ones(70_000, np.float32)
    with_nan[4321], with_inf[3] = np.nan, -np.inf
    (nan_row, inf_row) = fused.moments([with_nan, with_inf])
    assert np.isnan(nan_row[0]) and np.isnan(nan_row[3])
    assert inf_row[0] == -np.inf and inf_row[1] == np.inf and inf_row[2] == np.inf and inf_row[3] == np.inf


def test_statistics_are_moment_rows_arithmetic_to_the_bit_and_use_the_known_rows() -> None:
    rng = np.random.default_rng(2)
    arrays = [
        1e-3 * rng.standard_normal(70_000).astype(np.float32),
        (1000 + rng.standard_normal(5000)).astype(np.float32),  # one-pass would cancel: redo
        rng.standard_normal(300),  # float64
        np.zeros(17, np.float32),
        np.array([1.0, np.nan], np.float32),  # non-finite: redo
        rng.standard_normal((3, 4, 5)).astype(np.float32).transpose(2, 0, 1),  # dense, permuted
    ]
    found = np.array(fused.moments(arrays))
    sizes = np.array([a.size for a in arrays], dtype=np.float64)
    expected, expected_redo = moment_rows(found, sizes, fused=True)
    table, redo = fused.statistics(arrays, [None] * len(arrays), *_FUSED_BOUNDS)
    got = np.frombuffer(table).reshape(len(arrays), 6)
    np.testing.assert_array_equal(got, expected)  # bit for bit, NaN where NaN
    assert redo == expected_redo.tolist() == [1, 4]
    # a known row is taken as it is, not read again
    known: list[tuple[float, float, float, float] | None] = [None] * len(arrays)
    known[0] = (2.0, 4.0, 1.0, 8.0)
    table, _ = fused.statistics(arrays, known, *_FUSED_BOUNDS)
    n = arrays[0].size
    mean = 2.0 / n
    row = [mean, 4.0 / n, 1.0, max(8.0 / n - mean * mean, 0.0), 4.0, 8**0.5]
    np.testing.assert_array_equal(np.frombuffer(table).reshape(-1, 6)[0], row)
    table, redo = fused.statistics([np.empty(0, np.float32)], [None], *_FUSED_BOUNDS)
    assert np.isnan(np.frombuffer(table)).all() and redo == []
    with pytest.raises(ValueError, match="one entry of known per array"):
        fused.statistics(arrays, [None], *_FUSED_BOUNDS)
    with pytest.raises(TypeError, match="known rows are"):
        fused.statistics(arrays[:1], [(1.0, 2.0)], *_FUSED_BOUNDS)


def _pairs(dtype: type) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    snapshots = [(w + 1e-3 * rng.standard_normal(w.size)).astype(dtype) for w in weights]
    return weights, snapshots


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("keep", [True, False])
def test_update_norms_equal_float64_and_write_the_snapshot(dtype: type, keep: bool) -> None:
    weights, snapshots = _pairs(dtype)
    before = [s.copy() for s in snapshots]
    got = fused.update_norms(weights, snapshots, keep)
    for w, s, was, (delta, norm) in zip(weights, snapshots, before, got, strict=True):
        difference = was - w  # in the arrays' precision, as NumPy's subtract
        d = difference.astype(np.float64)
        assert abs(delta - float(d @ d)) <= max(w.size, 1) * 2.0**-52 * float(d @ d)
        if keep:
            x = w.astype(np.float64)
            assert abs(norm - float(x @ x)) <= max(w.size, 1) * 2.0**-52 * float(x @ x)
            np.testing.assert_array_equal(s, w)  # the snapshot is now the weight
        else:
            assert norm == 0.0
            np.testing.assert_array_equal(s, difference)  # left holding the difference, bit for bit


def test_update_norms_into_spares_leave_the_snapshots_and_give_the_same_bits() -> None:
    weights, snapshots = _pairs(np.float32)
    before = [s.copy() for s in snapshots]
    spares = [np.full_like(w, 7.0) for w in weights]
    aside = fused.update_norms(weights, snapshots, True, spares)
    for s, was, spare, w in zip(snapshots, before, spares, weights, strict=True):
        np.testing.assert_array_equal(s, was)
        np.testing.assert_array_equal(spare, w)
    assert aside == fused.update_norms(weights, snapshots, True)  # the same arithmetic, to the bit


def test_update_norms_agree_with_the_numpy_passes() -> None:
    weights, snapshots = _pairs(np.float32)
    theirs_snapshots = [s.copy() for s in snapshots]
    ours = fused.update_norms(weights, snapshots, True)
    theirs = numpy_update_norms(weights, theirs_snapshots, True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for a, b in zip(snapshots, theirs_snapshots, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_refused_with_what_is_wrong() -> None:
    ok = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        fused.moments([ok, np.ones(10, np.float16)])
    with pytest.raises(TypeError, match="float32 or float64"):
        fused.moments([np.ones(10, np.int32)])
    with pytest.raises((ValueError, BufferError), match="contiguous"):
        fused.moments([np.ones(20, np.float32)[::2]])
    with pytest.raises(TypeError, match="sequence"):
        fused.moments(3)
    read_only = np.ones(10, np.float32)
    read_only.flags.writeable = False
    with pytest.raises((ValueError, BufferError), match="read-only"):
        fused.update_norms([ok], [read_only], True)
    with pytest.raises(ValueError, match="1 weights and 2 snapshots"):
        fused.update_norms([ok], [ok.copy(), ok.copy()], True)
    with pytest.raises(ValueError, match="differ in dtype or size"):
        fused.update_norms([ok], [np.ones(11, np.float32)], True)
    with pytest.raises(ValueError, match="differ in dtype or size"):
        fused.update_norms([ok], [np.ones(10, np.float64)], True)
    with pytest.raises(ValueError, match="spares"):
        fused.update_norms([ok], [ok.copy()], True, [np.ones(3, np.float32)])
    assert fused.moments([]) == [] and fused.update_norms([], [], True) == []


def test_the_gil_is_released_for_the_whole_pass() -> None:
    # a long pass on another thread: if it held the GIL this thread could not run until it ended
    big = np.ones(1 << 22, np.float32)
    inside = threading.Event()
    done = threading.Event()
    ticks = 0

    def long_pass() -> None:
        inside.set()
        fused.moments([big] * 200)  # ~0.8G elements: tens of milliseconds at least
        done.set()

    worker = threading.Thread(target=long_pass)
    worker.start()
    inside.wait()
    time.sleep(0.001)  # the worker is in the kernel (the time it takes to get there is microseconds)
    while not done.is_set():
        ticks += 1
        time.sleep(0)
    worker.join()
    assert ticks > 10
