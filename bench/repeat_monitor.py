"""``bench_monitor.py`` run in several fresh processes, its ratios summarised across them.

Within one run every configuration trains its own copy of the model, and where that copy lands in
memory moves its step time for the whole run: the same code measured 1.027x-1.068x over four runs
in one hour, and ``one-read`` (about 1.01x by its cost) 0.983x-1.016x. A change of one point cannot
be seen in one run. Each process here places its copies anew, so the median over the processes of
each configuration's median ratio is the figure to quote, with the lowest and highest beside it.

Everything after ``--`` goes to ``bench_monitor.py`` unchanged (``--tag`` is set per process)::

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/repeat_monitor.py --runs 5 --tag _dec04 -- \\
        --threads 2 --rounds 201 --models mnist,bert --no-wandb

Writes ``results/monitor_t{threads}{tag}_runs.json``: per workload and configuration the ratios of
every run (whole step, blocks of 16, ``step()`` over one ``_foreach_norm``) and their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_results

HERE = Path(__file__).resolve().parent
FIGURES = ("step_ratio", "block_ratio", "call_over_foreach_norm")


def _threads(passed: list[str]) -> str:
    return passed[passed.index("--threads") + 1] if "--threads" in passed else "1"


def run_once(passed: list[str], tag: str) -> dict:
    """One ``bench_monitor.py`` process; its results file, read back and removed (its figures go
    into the summary)."""
    subprocess.run(
        [sys.executable, str(HERE / "bench_monitor.py"), *passed, "--tag", tag], check=True, env=os.environ
    )
    path = HERE / "results" / f"monitor_t{_threads(passed)}{tag}.json"
    results = json.loads(path.read_text())
    path.unlink()
    return results


def summarise(runs: list[dict]) -> dict:
    """Per workload and configuration: each figure's values over the runs and their median."""
    out: dict = {}
    for workload in runs[0]["workloads"]:
        configs: dict = {}
        for name in runs[0]["workloads"][workload]["configs"]:
            entry: dict = {}
            for figure in FIGURES:
                values = [r["workloads"][workload]["configs"][name].get(figure) for r in runs]
                if all(v is not None for v in values):
                    entry[figure] = {"runs": values, "median": statistics.median(values)}
            configs[name] = entry
        out[workload] = configs
    return out


def print_summary(summary: dict) -> None:
    for workload, configs in summary.items():
        print(f"\n== {workload}: median over runs [lowest, highest] ==")
        for name, entry in configs.items():
            parts = [
                f"{figure} x{e['median']:.3f} [{min(e['runs']):.3f}, {max(e['runs']):.3f}]"
                for figure, e in entry.items()
            ]
            print(f"  {name:<22} " + "  ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tag", default="_runs")
    args, passed = parser.parse_known_args()
    passed = [a for a in passed if a != "--"]
    runs = [run_once(passed, f"{args.tag}_run{k}") for k in range(args.runs)]
    summary = summarise(runs)
    print_summary(summary)
    path = save_results(
        f"monitor_t{_threads(passed)}{args.tag}_runs",
        {"arguments": passed, "runs": args.runs, "environment": runs[0]["environment"], "summary": summary},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
