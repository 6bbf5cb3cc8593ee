"""The per-tensor rules of a step's table in one C call (``alerts/table_kernel.py``,
``monitor/csrc/tensor_rules.c``) against the NumPy path (``alerts/tensor_rules.py``, itself tested
against a loop over the rows): the same alerts and the same rule state after every table, on
streams that spike, vanish, leave the ratio band on both sides and repeat tensors; the tables the
kernel declines leave the state untouched."""

from __future__ import annotations

import math
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

from bbdecoder.alerts import AlertConfig, AlertEngine
from bbdecoder.alerts import table_kernel as K
from bbdecoder.alerts.tensor_rules import TensorState
from bbdecoder.store.writer import RunWriter

pytest.importorskip("bbdecoder.monitor._fused", reason="the optional C extension is not built here")

STATE = ("window", *TensorState._PER_TENSOR)


class Counting:
    """The kernel module, counting the tables each function judged (a result) or declined (None)."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.judged, self.declined, self.onsets = kernel, 0, 0, 0

    def __getattr__(self, name: str) -> object:
        function = getattr(self.kernel, name)

        def counted(*args: object) -> object:
            out = function(*args)
            if out is None:
                self.declined += 1
            else:
                self.judged += 1
                self.onsets += len(out)
            return out

        return counted


def _config(rng: np.random.Generator) -> AlertConfig:
    window = int(rng.integers(1, 25))
    return AlertConfig(
        explode_window=window,
        explode_min_history=int(rng.integers(1, window + 1)),
        explode_factor=float(rng.choice([1.5, 3.0, 10.0])),
        explode_floor=float(rng.choice([0.0, 0.5, 1.0, 2.0])),
        vanish_patience=int(rng.integers(1, 4)),
        ratio_patience=int(rng.integers(1, 6)),
        ratio_warmup=int(rng.integers(0, 10)),
        exploding=bool(rng.random() < 0.85),
        vanishing=bool(rng.random() < 0.7),
        update_ratio=bool(rng.random() < 0.85),
    )


def _engine(tmp_path: Path, name: str, config: AlertConfig, tensors: list[tuple[int, str]]) -> tuple:
    writer = RunWriter(tmp_path / name)
    engine = AlertEngine(config, warn=False).attach(writer)
    series = np.array([writer.series_id(*key) for key in tensors])
    writer.set_layers([(lid, f"L{lid}", "Linear", 1, None) for lid in sorted({k[0] for k in tensors})])
    stats = [writer.stat_id(s) for s in ("l2", "l1", "max_abs", "mean", "std", "var")]
    return writer, engine, series, stats, writer.stat_id("update_ratio")


def _same_state(a: TensorState, b: TensorState) -> bool:
    return a.keys == b.keys and all(
        np.array_equal(getattr(a, name), getattr(b, name), equal_nan=name == "window") for name in STATE
    )


@pytest.mark.parametrize("seed", range(60))
def test_the_kernel_judges_a_table_as_the_numpy_path(tmp_path: Path, seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    config = _config(rng)
    tensors = [
        (i // 2, f"m{i // 2}." + ("weight" if i % 2 == 0 else "bias"))
        for i in range(int(rng.integers(1, 24)))
    ]
    fast = _engine(tmp_path, "fast", config, tensors)
    slow = _engine(tmp_path, "slow", config, tensors)
    counting = Counting(K.KERNEL)
    scale = 10.0 ** rng.uniform(-3, 2, len(tensors))
    for step in range(int(rng.integers(20, 70))):
        norms = rng.lognormal(0, 0.4, (len(tensors), 6)) * scale[:, None]
        spike = rng.random(len(tensors))
        norms[spike < 0.06, 0] *= 60.0  # exploding
        norms[(spike > 0.06) & (spike < 0.09), 0] = 0.0  # a vanishing candidate: the kernel declines
        if rng.random() < 0.03:
            norms[0, 0] = math.nan  # non-finite: the rows path for both
        ratios = 10.0 ** rng.uniform(-9, -2, (len(tensors), 1))
        ratios[rng.random(len(tensors)) < 0.3] = 1e-9  # runs below the band
        if rng.random() < 0.1:
            ratios[int(rng.integers(len(tensors)))] = 0.9  # above the band: the kernel declines
        tables = [(norms, fast[3]), (ratios, [fast[4]])]
        if seed % 3 == 0:  # one table holding both
            tables = [(np.hstack([norms, ratios]), [*fast[3], fast[4]])]
        for table, ids in tables:
            monkeypatch.setattr(K, "KERNEL", counting)
            fast[0].add_step_scalars(step, 0, fast[2], ids, table)
            monkeypatch.setattr(K, "KERNEL", None)
            slow[0].add_step_scalars(step, 0, slow[2], ids, table)
        assert _same_state(fast[1]._tensors, slow[1]._tensors), f"state differs after step {step}"
    assert [astuple(a) for a in fast[1].alerts] == [astuple(a) for a in slow[1].alerts]
    assert counting.judged > 0
    for writer in (fast[0], slow[0]):
        writer.close()


def test_the_streams_reach_the_kernels_onsets_and_its_declines(tmp_path: Path, monkeypatch) -> None:
    """The comparison above is only as good as its streams: the kernel itself fires exploding and
    below-the-band onsets in them, and declines tables too."""
    judged = declined = onsets = 0
    kinds: set[str] = set()
    for seed in range(60):
        counting = Counting(K.KERNEL)
        monkeypatch.setattr(K, "KERNEL", counting)
        rng = np.random.default_rng(seed)
        tensors = [(i, f"m{i}.weight") for i in range(6)]
        writer, engine, series, stats, ratio = _engine(tmp_path, f"s{seed}", _config(rng), tensors)
        for step in range(40):
            norms = rng.lognormal(0, 0.3, (6, 6))
            norms[rng.random(6) < 0.05, 0] *= 80.0
            norms[rng.random(6) < 0.02, 0] = 0.0
            ratios = np.where(rng.random((6, 1)) < 0.5, 1e-9, 1e-3)
            ratios[rng.random(6) < 0.02] = 0.9
            writer.add_step_scalars(step, 0, series, stats, norms)
            writer.add_step_scalars(step, 0, series, [ratio], ratios)
        kinds |= {a.kind for a in engine.alerts}
        writer.close()
        judged, declined, onsets = (
            judged + counting.judged,
            declined + counting.declined,
            onsets + counting.onsets,
        )
    assert judged > 1000 and declined > 50 and onsets > 100, (judged, declined, onsets)
    assert {"exploding_grad", "update_ratio_out_of_band"} <= kinds


def _state(n: int, window: int) -> TensorState:
    state = TensorState(window)
    for i in range(n):
        state.position((i, f"m{i}.weight"))
    return state


def test_a_declined_table_leaves_the_state_as_it_was() -> None:
    config = AlertConfig(vanish_patience=1)
    state = _state(3, 5)
    index = np.arange(3, dtype=np.int64)
    assert K.table_alerts(state, config, "l2", np.ones((3, 2)), 0, index, 0, 0, lambda i: ()) == []
    state.had_gradient[:] = True
    before = {name: getattr(state, name).copy() for name in STATE}
    table = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]])  # row 1 vanished (patience 1)
    assert K.table_alerts(state, config, "l2", table, 0, index, 1, 0, lambda i: ()) is None
    high = np.array([[1e-3], [0.9], [1e-3]])  # a ratio above the band
    assert K.table_alerts(state, config, "update_ratio", high, 0, index, 30, 0, lambda i: ()) is None
    assert all(np.array_equal(getattr(state, n), before[n], equal_nan=True) for n in STATE)


def test_tables_of_another_kind_go_to_the_numpy_path() -> None:
    state, config = _state(2, 4), AlertConfig()
    index = np.arange(2, dtype=np.int64)
    for table in (np.ones((2, 1), np.float32), np.ones(2), [[1.0], [1.0]], np.ones((2, 1))[:, :0]):
        assert K.table_alerts(state, config, "l2", table, 0, index, 0, 0, lambda i: ()) is None  # type: ignore[arg-type]
    assert K.table_alerts(state, config, "l2", np.ones((2, 1)), 0, index[:1], 0, 0, lambda i: ()) is None


def test_a_state_index_outside_the_state_raises() -> None:
    state, config = _state(2, 4), AlertConfig()
    with pytest.raises(IndexError, match="outside the 2 tensors"):
        K.table_alerts(state, config, "l2", np.ones((2, 1)), 0, np.array([0, 5]), 0, 0, lambda i: ())
    with pytest.raises(IndexError, match="outside the 2 tensors"):
        K.table_alerts(
            state, config, "update_ratio", np.ones((2, 1)) * 1e-3, 0, np.array([-1, 0]), 30, 0, lambda i: ()
        )
