"""Thread-CPU-time breakdown of ``Analyzer.step()`` by component, medians over 20 steps (1 thread,
or ``BENCH_THREADS`` torch threads).

Wraps the gradient statistics, the update ratios and the hand-over to the writer thread (on the
training thread), and the step's bookkeeping the writer thread then runs (``_record_vector``: rows,
epoch accumulators, the alert rules, the store's buffers; each part's CPU time on the thread that
runs it), and compares each with one ``torch._foreach_norm(grads, 2)`` over the same gradients,
timed after ``optimizer.step()``. Where torch leaves a core free, the update ratios and most
gradients are read on the writer thread outside ``step()`` (``monitor/ratio_prefetch.py``,
``monitor/grad_prefetch.py``): those reads are not among the parts. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/profile_monitor_step.py mnist bert resnet18
    BENCH_THREADS=2 OMP_NUM_THREADS=2 PYTHONPATH=src python bench/profile_monitor_step.py mnist bert
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor import _workload
from common import save_results

from bbdecoder.alerts.engine import AlertEngine
from bbdecoder.monitor import Analyzer
from bbdecoder.monitor.grad_stats import GradStatistics
from bbdecoder.monitor.weights import UpdateRatios
from bbdecoder.store.background import ThreadedRunWriter

_spent: dict[str, float] = collections.defaultdict(float)


def _wrap(owner: Any, name: str, label: str) -> None:  # a class or a module
    original: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            _spent[label] += time.thread_time() - start

    setattr(owner, name, timed)


def profile(name: str, steps: int = 25, warmup: int = 5) -> dict[str, float]:
    base, make_opt, (x, y), loss_fn = _workload(name)
    opt = make_opt(base)
    analyzer = Analyzer(base, tempfile.mkdtemp())
    per: dict[str, list[float]] = collections.defaultdict(list)
    norms = []
    for i in range(steps):
        loss = loss_fn(base(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _spent.clear()
        start = time.thread_time()
        analyzer.step(loss=loss)
        total = time.thread_time() - start
        opt.step()
        # the step's job on the writer thread is done: its parts are counted
        analyzer.writer.wait()  # type: ignore[attr-defined]
        grads = [p.grad for p in base.parameters() if p.grad is not None]
        start = time.thread_time()
        torch._foreach_norm(grads, 2)
        norm = time.thread_time() - start
        if i >= warmup:
            per["step() total"].append(total)
            norms.append(norm)
            for key, value in _spent.items():
                per[key].append(value)
    analyzer.close()
    reference = statistics.median(norms)
    print(f"== {name}: one _foreach_norm {reference * 1e3:.3f} ms (thread CPU)")
    out = {"foreach_norm_ms": reference * 1e3}
    for key, values in per.items():
        m = statistics.median(values)
        out[key] = m * 1e3
        print(f"  {key:<64} {m * 1e3:8.3f} ms {m / reference:6.1f}x")
    return out


def main() -> None:
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    _wrap(GradStatistics, "host", "gradient statistics")
    _wrap(UpdateRatios, "measure_host", "update ratios")
    _wrap(ThreadedRunWriter, "run_then_flush", "store: hand-over to the writer thread")
    _wrap(AlertEngine, "observe", "writer thread: alert rules")
    _wrap(AlertEngine, "observe_loss", "writer thread: alert rules")
    _wrap(ThreadedRunWriter, "add_scalars", "writer thread: buffering rows")
    import bbdecoder.monitor.capture as capture_module

    label = "writer thread: rows, epoch accumulators, alerts, buffers (_record_vector)"
    _wrap(capture_module, "_record_vector", label)
    result = {name: profile(name) for name in (sys.argv[1:] or ["mnist", "bert"])}
    print("wrote", save_results(f"monitor_step_profile_t{threads}", result))


if __name__ == "__main__":
    main()
