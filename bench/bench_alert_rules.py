"""The live alert rules' cost per recorded step, by model width (tensors).

A recorded step hands the store two tables (six gradient statistics per tensor, one update ratio
per tensor); with the default alerts the engine judges them on the writer thread (on CUDA, on the
training thread) while holding the GIL. Timed per step, in one process, interleaved, medians:

- ``rows``: building the step's row tuples, the store's own work and the cheapest there is;
- ``store``: ``RunWriter.add_step_scalars`` without an alert engine (rows into the buffer);
- ``live``: the same with the default ``AlertEngine`` attached (the tables judged from arrays);
- ``replay``: the engine judging the same rows one by one (``_judged``, ``_named``, ``observe``:
  the row path a replay takes, and the live path before the tables).

    python bench/bench_alert_rules.py [--steps 400] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import environment, save_results

from bbdecoder.alerts import AlertEngine
from bbdecoder.store.writer import RunWriter, table_rows

WIDTHS = (8, 54, 200, 400)  # the MNIST CNN, BERT-mini, a BERT-base-sized and a ViT-L-sized model
STATS = ("l2", "l1", "max_abs", "mean", "std", "var")


def _writer(folder: Path, tensors: int, alerts: bool) -> tuple[RunWriter, np.ndarray, list[int], int]:
    writer = RunWriter(folder)
    names = [(i // 2, f"block{i // 2}." + ("weight" if i % 2 == 0 else "bias")) for i in range(tensors)]
    series = np.array([writer.series_id(*key) for key in names])
    writer.set_layers([(lid, f"block{lid}", "Linear", 1, None) for lid in sorted({k[0] for k in names})])
    stats = [writer.stat_id(s) for s in STATS]
    if alerts:
        AlertEngine(warn=False).attach(writer)
    return writer, series, stats, writer.stat_id("update_ratio")


def measure(tensors: int, steps: int, folder: Path) -> dict[str, float]:
    rng = np.random.default_rng(0)
    store = _writer(folder / "store", tensors, alerts=False)
    live = _writer(folder / "live", tensors, alerts=True)
    replay_writer = _writer(folder / "replay", tensors, alerts=False)
    replay = AlertEngine(warn=False)  # not attached: it judges, nothing is stored
    times: dict[str, list[float]] = {"rows": [], "store": [], "live": [], "replay": []}

    def tables() -> tuple[np.ndarray, np.ndarray]:  # healthy steps: the rules judge, none fires
        return rng.lognormal(0, 0.3, (tensors, 6)), rng.lognormal(-7, 0.3, (tensors, 1))

    def add(target: tuple[RunWriter, np.ndarray, list[int], int], step: int, t: tuple) -> None:
        writer, series, stats, ratio = target
        writer.add_step_scalars(step, 0, series, stats, t[0])
        writer.add_step_scalars(step, 0, series, [ratio], t[1])
        writer._scalars.clear()  # the buffer: not what is timed

    def judge(step: int, t: tuple) -> None:
        writer, series, stats, ratio = replay_writer
        for table, ids in ((t[0], stats), (t[1], [ratio])):
            judged = replay._judged(writer, table_rows(step, 0, series, ids, table))
            replay.observe(replay._named(writer, judged))

    def rows(step: int, t: tuple) -> None:
        _, series, stats, ratio = store
        table_rows(step, 0, series, stats, t[0])
        table_rows(step, 0, series, [ratio], t[1])

    methods: dict[str, Callable[[int, tuple], None]] = {
        "rows": rows,
        "store": lambda step, t: add(store, step, t),
        "live": lambda step, t: add(live, step, t),
        "replay": judge,
    }
    names = list(methods)
    for step in range(steps):
        t = tables()
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            methods[name](step, t)
            if step >= 30:  # the windows full, as in a long run
                times[name].append(time.perf_counter() - start)
    for writer, *_ in (store, live, replay_writer):
        writer.close()
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="60 steps (a smoke run)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    steps = 60 if args.quick else args.steps
    results: dict = {"environment": environment(), "steps": steps, "widths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for tensors in WIDTHS:
            medians = measure(tensors, steps, Path(tmp) / str(tensors))
            results["widths"][str(tensors)] = medians
            rules_live = medians["live"] - medians["store"]
            rules_rows = medians["replay"]
            print(
                f"{tensors:>4} tensors: rows {medians['rows'] * 1e6:6.0f} us"
                f"  store {medians['store'] * 1e6:6.0f} us"
                f"  live {medians['live'] * 1e6:6.0f} us (rules {rules_live * 1e6:5.0f} us)"
                f"  row path {rules_rows * 1e6:6.0f} us",
                flush=True,
            )
    print(save_results(f"alert_rules{args.tag}", results))


if __name__ == "__main__":
    main()
