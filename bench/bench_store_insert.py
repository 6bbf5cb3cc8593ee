"""One flush of the run store: multi-row inserts (``store.bulk_insert``) against ``executemany``.

A recorded step is one transaction (``flush_every=1``) of one ``steps`` row and six gradient
statistics plus an update ratio per tensor in ``scalars``: 57 rows for the MNIST-sized CNN (8
tensors), 379 for the small BERT (54 tensors). The transaction runs on the store's writer thread
while the training thread works; what matters is its time and how much of the GIL it leaves to the
training thread. Each case is timed alone and beside a competing thread that spins in Python
(its share of the iterations it would make alone, during the transaction, is the GIL left to it).

    python bench/bench_store_insert.py [--rounds 300] [--blocks 10] [--quick]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import environment, save_results

from bbdecoder.store.bulk_insert import insert_rows
from bbdecoder.store.connection import connect_readwrite
from bbdecoder.store.schema import DDL

CASES = {"mnist": 8, "bert": 54}


def executemany_rows(conn: sqlite3.Connection, head: str, rows: list[tuple]) -> None:
    """The store's previous write: one statement step (and GIL hand-over) per row."""
    if rows:
        conn.executemany(f"{head} ({', '.join('?' * len(rows[0]))})", rows)


def _step_rows(step: int, tensors: int) -> tuple[list[tuple], list[tuple]]:
    scalars = [
        (step, 0, series, stat, 1.0 / (1 + step + series + stat))
        for series in range(tensors)
        for stat in range(7)
    ]
    return [(step, 0, time.time(), 2.5)], scalars


class Spinner:
    """A Python loop on another thread: the training thread's share of the GIL."""

    def __init__(self) -> None:
        self.count = 0
        self.running = True
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while self.running:
            self.count += 1

    def __enter__(self) -> Spinner:
        self.thread.start()
        time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def measure(tensors: int, rounds: int, insert: Callable, competitor: bool, conn: sqlite3.Connection) -> dict:
    seconds: list[float] = []
    share: list[float] = []
    step = int(conn.execute("SELECT COALESCE(MAX(step), 0) FROM steps").fetchone()[0]) + 1

    def one(spinner: Spinner | None) -> None:
        nonlocal step
        steps, scalars = _step_rows(step, tensors)
        step += 1
        before = spinner.count if spinner else 0
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        insert(conn, "INSERT INTO steps VALUES", steps)
        insert(conn, "INSERT INTO scalars VALUES", scalars)
        conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        seconds.append(elapsed)
        if spinner is not None:
            share.append((spinner.count - before) / elapsed)

    if competitor:
        with Spinner() as spinner:
            t0, c0 = time.perf_counter(), spinner.count
            time.sleep(0.05)
            alone_rate = (spinner.count - c0) / (time.perf_counter() - t0)
            for _ in range(rounds):
                one(spinner)
        return {
            "median_s": statistics.median(seconds),
            "gil_left_to_the_other_thread": statistics.median(share) / alone_rate,
        }
    for _ in range(rounds):
        one(None)
    return {"median_s": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=10, help="blocks per method, alternated")
    parser.add_argument("--quick", action="store_true", help="40 rounds in 4 blocks (a smoke run)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.blocks = 40, 4
    methods = {"executemany": executemany_rows, "multi-row": insert_rows}
    results: dict = {"environment": environment(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case, tensors in CASES.items():
            for competitor in (False, True):
                label = f"{case}{' + spinning thread' if competitor else ''}"
                conns = {}
                for name, insert in methods.items():
                    conns[name] = connect_readwrite(Path(tmp) / f"{case}_{name}_{competitor}.sqlite")
                    conns[name].execute("PRAGMA journal_mode = WAL")  # as RunWriter opens a store
                    conns[name].execute("PRAGMA synchronous = NORMAL")
                    conns[name].executescript(DDL)
                    measure(tensors, 20, insert, competitor, conns[name])  # warm-up: statement cache
                parts: dict[str, list[dict]] = {name: [] for name in methods}
                per_block = max(1, args.rounds // args.blocks)
                for block in range(args.blocks):  # alternated, so load drift hits both alike
                    order = list(methods) if block % 2 == 0 else list(methods)[::-1]
                    for name in order:
                        parts[name].append(
                            measure(tensors, per_block, methods[name], competitor, conns[name])
                        )
                for conn in conns.values():
                    conn.close()
                entry: dict = {
                    name: {k: statistics.median(p[k] for p in parts[name]) for k in parts[name][0]}
                    for name in methods
                }
                entry["speedup"] = entry["executemany"]["median_s"] / entry["multi-row"]["median_s"]
                results["cases"][label] = entry
                line = "  ".join(
                    f"{n} {entry[n]['median_s'] * 1e3:.3f} ms"
                    + (f" (GIL left {entry[n]['gil_left_to_the_other_thread']:.0%})" if competitor else "")
                    for n in methods
                )
                print(f"{label:<24} {tensors * 7 + 1} rows: {line}  x{entry['speedup']:.2f}", flush=True)
    print(save_results(f"store_insert{args.tag}", results))


if __name__ == "__main__":
    main()
