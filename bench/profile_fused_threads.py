"""Wall time of the fused kernels inside a training loop, split over torch's threads or not.

One model and one ``Analyzer``; the steps alternate between the kernels on torch's intra-op threads
(the default, ``cpu_reductions.kernel_threads()``) and on the calling thread alone, so both see
the same caches, load and gradients. Times the gradient statistics (``fused_statistics``), the
update-ratio pass (``update_norms``) and the whole ``Analyzer.step()``; medians. Run::

    OMP_NUM_THREADS=2 PYTHONPATH=src python bench/profile_fused_threads.py mnist bert --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor import _workload
from common import environment, kernels_on_one_thread, pin_threads, save_results, thread_arg

from bbdecoder.monitor import Analyzer, cpu_reductions, grad_stats, weights

_times: dict[tuple[str, bool], list[float]] = {}


def _timed(module: Any, name: str, key: str) -> None:
    inner: Callable[..., Any] = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        _times.setdefault((key, cpu_reductions._THREADED), []).append(time.perf_counter() - t0)
        return out

    setattr(module, name, timed)


def measure(workload: str, steps: int) -> dict[str, float]:
    _times.clear()
    model, make_opt, (x, y), loss_fn = _workload(workload)
    opt = make_opt(model)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(model, Path(tmp) / "run")
        try:
            for s in range(steps):
                with kernels_on_one_thread(s % 2 == 0):
                    loss = loss_fn(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    t0 = time.perf_counter()
                    analyzer.step(loss=loss)
                    spent = time.perf_counter() - t0
                    _times.setdefault(("step()", cpu_reductions._THREADED), []).append(spent)
                    opt.step()
        finally:
            analyzer.close()
    out = {}
    print(f"== {workload}")
    for key in ("fused_statistics", "update_norms", "step()"):
        one, many = (statistics.median(_times[(key, t)][5:]) for t in (False, True))
        out[f"{key}_one_thread_s"], out[f"{key}_threads_s"] = one, many
        print(f"  {key:<17} one thread {one * 1e3:.3f} ms, torch's threads {many * 1e3:.3f} ms", end="")
        print(f" ({one / many:.2f}x)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workloads", nargs="*", default=["mnist", "bert"])
    parser.add_argument("--steps", type=int, default=201)
    thread_arg(parser, default=2)
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    if not cpu_reductions.fused_threads():
        raise SystemExit("the fused kernels did not find torch's OpenMP runtime here: nothing to compare")
    _timed(grad_stats, "fused_statistics", "fused_statistics")
    _timed(weights, "update_norms", "update_norms")
    results = {w: measure(w, args.steps) for w in args.workloads}
    path = save_results(
        f"fused_threads_t{threads}", {"environment": environment(), "steps": args.steps, "workloads": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
