"""The per-tensor alert rules on arrays (``alerts/tensor_rules.py``) against a plain loop over the
rows, on random streams that hit every edge (spikes, vanishing runs, NaN and Inf, biases beside
their weights, tensors repeated within a step, several steps in one call, tensors that appear
late); and the live path that judges a step's table from its arrays against the rows it stores."""

from __future__ import annotations

import math
import random
import re
import statistics
import threading
from collections import deque
from dataclasses import astuple
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from bbdecoder.alerts import AlertConfig, AlertEngine
from bbdecoder.store.writer import RunWriter, table_rows

TENSOR_KINDS = ("exploding_grad", "vanishing_grad", "update_ratio_out_of_band")


class LoopRules:
    """The oracle: the three per-tensor rules as a loop over one step's rows, state in dicts."""

    def __init__(self, c: AlertConfig) -> None:
        self.c = c
        self.history: dict[tuple, deque] = {}
        self.peak: dict[tuple, float] = {}
        self.ongoing: set[tuple] = set()
        self.low_norm: dict[tuple, int] = {}
        self.had: set[tuple] = set()
        self.low_ratio: dict[tuple, int] = {}
        self.first: int | None = None
        self.out: list[tuple] = []

    def feed(self, rows: list[tuple]) -> None:
        steps: dict[tuple[int, int], list[tuple]] = {}
        for r in rows:
            steps.setdefault((r[0], r[1]), []).append(r)
        for (step, _), part in sorted(steps.items()):
            self.first = step if self.first is None else self.first
            self.norms([r for r in part if r[5] == "l2" and r[4]])
            self.ratios(step, [r for r in part if r[5] == "update_ratio" and r[4]])

    def onset(self, key: tuple, bad: bool) -> bool:
        fired = bad and key not in self.ongoing
        (self.ongoing.add if bad else self.ongoing.discard)(key)
        return fired

    @staticmethod
    def weight_of(rows: list[tuple], bias_row: tuple) -> float | None:
        if not bias_row[4].endswith("bias"):
            return None
        found = None
        for r in rows:  # the last weight row of the same layer and module wins
            if r[4].endswith("weight") and (r[2], r[4].rpartition(".")[0]) == (
                bias_row[2],
                bias_row[4].rpartition(".")[0],
            ):
                found = r[6]
        return found

    def norms(self, rows: list[tuple]) -> None:
        c = self.c
        largest = max([r[6] for r in rows if math.isfinite(r[6])], default=0.0)
        for r in rows:
            key, value = (r[2], r[4]), r[6]
            history = self.history.setdefault(key, deque(maxlen=c.explode_window))
            if not math.isfinite(value):
                continue
            if c.exploding and len(history) >= c.explode_min_history:
                median = statistics.median(history)
                peak = self.peak[key] = max(self.peak.get(key, 0.0), median)
                limit = max(c.explode_factor * median, c.explode_floor * peak)
                if self.onset(("x", *key), median > 0 and value > limit):
                    self.out.append(("exploding_grad", r[0], r[2], r[4], value, limit, len(history)))
            history.append(value)
            if c.vanishing:
                limit = max(c.vanish_relative * largest, c.vanish_absolute)
                low = self.low_norm[key] = self.low_norm.get(key, 0) + 1 if value < limit else 0
                if low == 0:
                    self.had.add(key)
                gone = low >= c.vanish_patience and key in self.had
                weight = self.weight_of(rows, r)
                gone = gone and not (weight is not None and weight >= limit)
                if self.onset(("v", *key), gone):
                    self.out.append(("vanishing_grad", r[0], r[2], r[4], value, limit, low))

    def ratios(self, step: int, rows: list[tuple]) -> None:
        c = self.c
        if not c.update_ratio:
            return
        for r in rows:
            key, value = (r[2], r[4]), r[6]
            if not math.isfinite(value) or step - self.first < c.ratio_warmup:
                continue
            low = self.low_ratio[key] = self.low_ratio.get(key, 0) + 1 if value < c.ratio_low else 0
            high = value > c.ratio_high
            if high and r[4].endswith("bias"):
                weight = self.weight_of(rows, r)
                high = weight is None or not math.isfinite(weight) or weight > c.ratio_high
            if self.onset(("r", *key), high or low >= c.ratio_patience):
                limit, run = (c.ratio_high, None) if high else (c.ratio_low, low)
                self.out.append(("update_ratio_out_of_band", r[0], r[2], r[4], value, limit, run))


def random_stream(seed: int) -> tuple[list[list[tuple]], AlertConfig]:
    """Calls of rows ``(step, epoch, layer_id, layer, param, stat, value)`` and a config."""
    rnd = random.Random(seed)
    tensors = [(rnd.randint(0, 4), rnd.choice(["weight", "bias", "in_proj_weight", "in_proj_bias", "gamma"]))
               for _ in range(rnd.randint(1, 12))]  # fmt: skip
    tensors = [(lid, f"m{lid}.{name}") for lid, name in tensors]
    scale = [10 ** rnd.uniform(-14, 2) for _ in tensors]
    zero_from_start = [rnd.random() < 0.2 for _ in tensors]
    late = [rnd.randint(0, 30) if rnd.random() < 0.2 else 0 for _ in tensors]  # appears at this step
    steps = []
    for s in range(rnd.randint(5, 70)):
        rows = []
        for j, (lid, param) in enumerate(tensors):
            if s < late[j]:
                continue
            u, v = rnd.random(), scale[j] * math.exp(rnd.gauss(0, 0.5))
            v = rnd.choice([0.0, 1e-20, 1e-13]) if zero_from_start[j] else v
            v = v * 100 if u < 0.05 else rnd.choice([0.0, 1e-15, 1e-9]) if u < 0.1 else v
            v = rnd.choice([math.nan, math.inf]) if 0.1 <= u < 0.12 else v
            rows.append((s, s // 10, lid, f"L{lid}", param, "l2", v))
            ratio = (
                10 ** rnd.uniform(-9, 0.3)
                if rnd.random() > 0.05
                else rnd.choice([math.inf, math.nan, 0.0, 0.9])
            )
            rows.append((s, s // 10, lid, f"L{lid}", param, "update_ratio", ratio))
            if rnd.random() < 0.03:  # the same tensor twice in one step
                rows.append((s, s // 10, lid, f"L{lid}", param, "l2", v * rnd.choice([1, 30])))
        if rnd.random() < 0.3:
            rnd.shuffle(rows)
        steps.append(rows)
    calls, i = [], 0
    while i < len(steps):
        k = rnd.choice([1, 1, 1, 2, 3])
        calls.append([r for rows in steps[i : i + k] for r in rows])
        i += k
    config = AlertConfig()
    if rnd.random() < 0.5:
        window = rnd.randint(1, 25)
        config = AlertConfig(
            explode_window=window, explode_min_history=rnd.randint(1, window),
            explode_floor=rnd.choice([0.0, 0.5, 1.0, 2.0]), explode_factor=rnd.choice([1.5, 3, 10]),
            vanish_patience=rnd.randint(1, 4), ratio_patience=rnd.randint(1, 6),
            ratio_warmup=rnd.randint(0, 25),
            exploding=rnd.random() < 0.8, vanishing=rnd.random() < 0.8, update_ratio=rnd.random() < 0.8,
        )  # fmt: skip
    return calls, config


def engine_view(alerts: list) -> list[tuple]:
    """The per-tensor alerts as the oracle records them; the count is the history length (exploding)
    or the run length (vanishing, a ratio below the band) the message states."""
    out = []
    for a in alerts:
        if a.kind in TENSOR_KINDS:
            count = re.search(r"of its last (\d+) steps|for (\d+) steps", a.message)
            number = None if count is None else int(count.group(1) or count.group(2))
            out.append((a.kind, a.step, a.layer_id, a.param, a.value, a.threshold, number))
    return out


def same(a: list[tuple], b: list[tuple]) -> bool:
    def eq(x: object, y: object) -> bool:
        return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))

    return len(a) == len(b) and all(
        len(p) == len(q) and all(map(eq, p, q)) for p, q in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("seed", range(300))
def test_rules_on_arrays_equal_a_loop_over_the_rows(seed: int) -> None:
    calls, config = random_stream(seed)
    engine, loop = AlertEngine(config, warn=False), LoopRules(config)
    for rows in calls:
        engine.observe(rows)
        loop.feed(rows)
    assert same(engine_view(engine.alerts), loop.out)


def test_the_streams_reach_every_rule() -> None:
    """The oracle test above is only as good as its streams: each rule fires in them, and so do the
    bias exemptions (a bias beside a learning weight) and the repeated tensors."""
    kinds: dict[str, int] = {}
    for seed in range(300):
        calls, config = random_stream(seed)
        engine = AlertEngine(config, warn=False)
        for rows in calls:
            engine.observe(rows)
        for a in engine.alerts:
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
    assert all(kinds.get(k, 0) >= 50 for k in TENSOR_KINDS), kinds


def _live_writer(tmp_path: Path, config: AlertConfig) -> tuple[RunWriter, AlertEngine]:
    writer = RunWriter(tmp_path / "run")
    return writer, AlertEngine(config, warn=False).attach(writer)


@pytest.mark.parametrize("seed", range(40))
def test_a_step_table_is_judged_as_its_rows(tmp_path: Path, seed: int) -> None:
    """The live path (a step's table judged from its arrays) against the same rows observed one
    by one; the stored rows are the table's rows."""
    rng = np.random.default_rng(seed)
    config = AlertConfig(explode_factor=3.0, explode_min_history=2, ratio_warmup=3, vanish_patience=2)
    writer, live = _live_writer(tmp_path, config)
    names = [
        (i // 2, f"m{i // 2}." + ("weight" if i % 2 == 0 else "bias"))
        for i in range(int(rng.integers(1, 30)))
    ]
    series = np.array([writer.series_id(*key) for key in names])
    writer.set_layers([(lid, f"L{lid}", "Linear", 1, None) for lid in sorted({k[0] for k in names})])
    stats = [writer.stat_id(s) for s in ("l2", "l1", "max_abs", "mean", "std", "var")]
    ratio = writer.stat_id("update_ratio")
    replay = AlertEngine(config, warn=False)
    stored: list[tuple] = []
    for step in range(40):
        shown = series[: max(1, len(series) - max(0, 20 - step))]  # tensors appear step by step
        values = rng.lognormal(0, 1, (len(shown), 6)) * rng.choice(
            [1.0, 50.0, 1e-12], size=(len(shown), 1), p=[0.8, 0.1, 0.1]
        )
        if rng.random() < 0.1:
            values[rng.integers(len(shown)), 0] = rng.choice([np.nan, np.inf])
        ratios = rng.lognormal(-7, 3, (len(shown), 1))
        tables = [(values, stats), (ratios, [ratio])]
        if seed % 2:  # one table holding both the norms and the ratios
            tables = [(np.hstack([values, ratios]), [*stats, ratio])]
        for table, ids in tables:
            writer.add_step_scalars(step, 0, shown, ids, table)
        for table, ids in tables:
            rows = table_rows(step, 0, shown, ids, table)
            replay.observe(live._named(writer, rows))
            stored += rows
    assert repr(writer._scalars) == repr(stored)  # repr: NaN equals NaN, -0.0 differs from 0.0
    assert [astuple(a) for a in live.alerts] == [astuple(a) for a in replay.alerts]
    assert len(live.alerts) > 0
    writer.close()


class TableThenAnotherThread(RunWriter):
    """A writer whose table call lets another thread add rows before it returns (while the engine
    is inside the table)."""

    other_rows: ClassVar[list[tuple]] = []

    def add_step_scalars(self, *args: object) -> None:  # type: ignore[override]
        super().add_step_scalars(*args)  # type: ignore[arg-type]
        other = threading.Thread(target=self.add_scalars, args=(self.other_rows,))
        other.start()
        other.join()


def test_rows_added_on_another_thread_during_a_table_are_judged(tmp_path: Path) -> None:
    """The engine skips the rows a table passes to ``add_scalars`` (it judges the arrays); a flag
    shared by threads would also skip the rows another thread adds meanwhile."""
    writer = TableThenAnotherThread(tmp_path / "run")
    engine = AlertEngine(AlertConfig(nonfinite=True), warn=False).attach(writer)
    sid, l2 = writer.series_id(1, "m.weight"), writer.stat_id("l2")
    writer.other_rows = [(7, 0, sid, l2, math.nan)]
    writer.add_step_scalars(3, 0, np.array([sid]), [l2], np.ones((1, 1)))
    assert [(a.kind, a.step) for a in engine.alerts] == [("nonfinite_grad", 7)]
    writer.close()


def test_a_table_is_judged_once(tmp_path: Path) -> None:
    """A table with a NaN goes through the rows: one alert, not one from the rows and one from the
    table."""
    writer, engine = _live_writer(tmp_path, AlertConfig(nonfinite=True))
    ids = np.array([writer.series_id(1, "m.weight"), writer.series_id(1, "m.bias")])
    writer.add_step_scalars(0, 0, ids, [writer.stat_id("l2")], np.array([[1.0], [np.nan]]))
    assert [(a.kind, a.param) for a in engine.alerts] == [("nonfinite_grad", "m.bias")]
    writer.close()


def test_a_series_without_a_parameter_name_is_not_judged_as_a_tensor(tmp_path: Path) -> None:
    """A row path rule reads tensors only (a layer's own series has param ""): in a table too."""
    writer, engine = _live_writer(tmp_path, AlertConfig())
    ids = np.array([writer.series_id(1, ""), writer.series_id(2, "m.weight")])
    l2 = writer.stat_id("l2")
    for step in range(12):
        norms = np.full((2, 1), 1.0 if step < 11 else 1e3)  # both spike at step 11
        writer.add_step_scalars(step, 0, ids, [l2], norms)
    assert [(a.kind, a.layer_id, a.step) for a in engine.alerts] == [("exploding_grad", 2, 11)]
    writer.close()


@pytest.mark.parametrize("seed", range(6))
def test_each_table_layout_keeps_its_own_state_index(tmp_path: Path, seed: int) -> None:
    """The live path keeps how it reads a table by the table's layout (its series and statistics):
    the same series in another order, a subset, a series twice, and layouts coming back must each
    find every tensor's own state. Against the rows judged one by one."""
    rng = np.random.default_rng(seed)
    config = AlertConfig(explode_factor=3.0, explode_min_history=2, ratio_warmup=2, vanish_patience=2)
    writer, live = _live_writer(tmp_path, config)
    names = [(i // 2, f"m{i // 2}." + ("weight" if i % 2 == 0 else "bias")) for i in range(8)]
    series = np.array([writer.series_id(*key) for key in names])
    writer.set_layers([(lid, f"L{lid}", "Linear", 1, None) for lid in sorted({k[0] for k in names})])
    l2, ratio = writer.stat_id("l2"), writer.stat_id("update_ratio")
    layouts = [series, series[::-1], series[[3, 1, 6]], np.concatenate([series[:4], series[:2]])]
    replay = AlertEngine(config, warn=False)
    for step in range(60):
        shown = layouts[int(rng.integers(len(layouts)))]
        norms = rng.lognormal(0, 0.3, (len(shown), 1)) * rng.choice(
            [1.0, 40.0, 1e-9], size=(len(shown), 1), p=[0.85, 0.1, 0.05]
        )
        ratios = rng.lognormal(-7, 3, (len(shown), 1))
        for table, stat in ((norms, l2), (ratios, ratio)):
            writer.add_step_scalars(step, 0, shown, [stat], table)
            replay.observe(live._named(writer, table_rows(step, 0, shown, [stat], table)))
    assert [astuple(a) for a in live.alerts] == [astuple(a) for a in replay.alerts]
    assert {a.kind for a in live.alerts} >= {"exploding_grad", "update_ratio_out_of_band"}
    assert len(live._plans._plans) == len(layouts) * 2
    writer.close()


def test_the_rules_take_turns_between_threads(tmp_path: Path) -> None:
    """A user's ``log(loss=...)`` on the training thread and a job on the writer thread both run
    the rules; the second waits for the first (the threaded writer's own lock), so the rules'
    state is never updated by two threads at once."""
    import time

    from bbdecoder.store.background import ThreadedRunWriter

    writer = ThreadedRunWriter(tmp_path / "run")
    engine = AlertEngine(warn=False).attach(writer)
    order: list[tuple[str, int]] = []
    entered, release = threading.Event(), threading.Event()
    judge = engine.observe_loss

    def slow(step: int, epoch: int, loss: float) -> list:
        order.append(("start", step))
        if step == 0:
            entered.set()
            release.wait(10)
        out = judge(step, epoch, loss)
        order.append(("end", step))
        return out

    engine.observe_loss = slow  # type: ignore[method-assign]
    first = threading.Thread(target=writer.set_loss, args=(0, 1.0))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=writer.set_loss, args=(1, 2.0))
    second.start()
    time.sleep(0.2)  # without the lock the second thread's rules would run now
    release.set()
    first.join(10)
    second.join(10)
    assert order == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    writer.close()


def test_an_alert_raised_on_the_training_thread_while_a_job_waits_does_not_deadlock(tmp_path: Path) -> None:
    """The rules on the training thread store their alert as an event (the writer's lock) while a
    writer-thread job (which holds that lock) waits to run the rules: with one lock for both
    there is one order, so both finish."""
    from bbdecoder.store.background import ThreadedRunWriter

    writer = ThreadedRunWriter(tmp_path / "run")
    engine = AlertEngine(warn=False).attach(writer)
    for step in range(10):
        writer.add_step(step, 0, 1.0)  # a loss history: step 10's loss is a spike
    sid, l2 = writer.series_id(1, "m.weight"), writer.stat_id("l2")
    entered, release = threading.Event(), threading.Event()
    judge = engine.observe_loss

    def slow(step: int, epoch: int, loss: float) -> list:
        if step == 10:
            entered.set()
            release.wait(10)
        return judge(step, epoch, loss)

    engine.observe_loss = slow  # type: ignore[method-assign]
    spike = threading.Thread(target=writer.add_step, args=(10, 0, 100.0), daemon=True)
    spike.start()
    assert entered.wait(10)
    job_started = threading.Event()

    def job() -> None:  # on the writer thread, holding the writer's lock
        job_started.set()
        writer.add_step_scalars(10, 0, np.array([sid]), [l2], np.ones((1, 1)))

    writer.run_then_flush(job)
    # one lock: the job cannot start while the training thread's rules hold it (the wait times out);
    # two locks: it starts at once and waits for the rules' lock while holding the writer's
    job_started.wait(0.5)
    release.set()
    spike.join(10)
    assert not spike.is_alive(), "deadlock: the training thread's alert waits for the writer's lock"
    writer.wait()
    assert [a.kind for a in engine.alerts] == ["loss_spike"]
    writer.close()
