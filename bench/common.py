"""Timing and memory helpers shared by the benchmark scripts.

Timing: every method runs in the same process on the same model, weights and input. Methods are
*interleaved* (one call of each per round, the starting method rotated every round), so a change in
machine load hits all of them alike; we report medians and, for ratios, the median of the per-round
ratios (paired, hence robust to load drifting between rounds).

Peak memory: ``tracemalloc`` does not see torch's CPU allocations, and torch (2.14) has no CPU
allocator statistics, so we measure the process's resident set. Each measurement runs in a *fresh*
subprocess (``python SCRIPT --memory-case CASE``) that builds the model and input, runs the method once
as warm-up (one-time allocations: thread pools, oneDNN primitives), records its RSS, resets the kernel's
peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs the method again and reads ``VmHWM``
from ``/proc/self/status``: peak = VmHWM - RSS before the call. ``MALLOC_MMAP_THRESHOLD_=65536`` makes
glibc serve every large block with mmap and give it back on free, so RSS follows torch's live tensors
instead of glibc's heap high-water mark. Where ``clear_refs`` is not writable, we fall back to
``ru_maxrss`` (no warm-up) minus the RSS before the call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def pin_threads(threads: int = 2) -> int:
    """Pin torch's intra-op (and, when still possible, inter-op) thread pools, and OpenCV's (grad-cam
    resizes with cv2); returns the torch thread count used."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started
        torch.set_num_interop_threads(1)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    return torch.get_num_threads()


def thread_arg(parser: argparse.ArgumentParser, default: int = 2) -> None:
    """``--threads N`` (default 2): torch threads for the timed methods; results go to ``NAME_tN.json``."""
    parser.add_argument("--threads", type=int, default=default, help=f"torch/cv2 threads (default {default})")


@contextlib.contextmanager
def kernels_on_one_thread(active: bool = True) -> Iterator[None]:
    """With ``active``, the monitor's fused kernels run on the calling thread alone meanwhile
    instead of over torch's intra-op threads (the ``-onethread`` ablations); else nothing changes."""
    from bbdecoder.monitor import cpu_reductions

    threaded = cpu_reductions._THREADED
    cpu_reductions._THREADED = threaded and not active
    try:
        yield
    finally:
        cpu_reductions._THREADED = threaded


@dataclass
class Timing:
    """Wall-clock seconds of the timed calls of one method, in round order."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.seconds) < 2:
            return self.seconds[0], self.seconds[0]
        q = statistics.quantiles(self.seconds, n=4)
        return q[0], q[2]

    def summary(self) -> dict[str, Any]:
        q1, q3 = self.quartiles
        return {
            "median_s": self.median,
            "q1_s": q1,
            "q3_s": q3,
            "min_s": min(self.seconds),
            "repeats": len(self.seconds),
        }


def interleaved(
    methods: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2, verbose: bool = True
) -> dict[str, Timing]:
    """Time each method ``repeats`` times, one call of each per round, rotating who goes first.

    Every method is first called ``warmup`` times (untimed). Returns one :class:`Timing` per method.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    timings = {name: Timing(name) for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            methods[name]()
            timings[name].seconds.append(time.perf_counter() - start)
        if verbose:
            line = "  ".join(f"{n}={timings[n].seconds[-1] * 1e3:.0f}ms" for n in names)
            print(f"    round {round_index + 1}/{repeats}: {line}", flush=True)
    return timings


def paired_ratio(numerator: Timing, denominator: Timing) -> dict[str, float]:
    """Median and quartiles of the per-round ratios numerator/denominator, and the ratio of medians."""
    ratios = [a / b for a, b in zip(numerator.seconds, denominator.seconds, strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "median_of_ratios": statistics.median(ratios),
        "q1": q[0],
        "q3": q[2],
        "ratio_of_medians": numerator.median / denominator.median,
    }


# -- memory ---------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_of_call(fn: Callable[[], object], reset: Callable[[], object] | None = None) -> dict[str, Any]:
    """Peak resident-set growth (MiB) while ``fn()`` runs, in *this* process (call it in a fresh one).

    ``reset`` runs after the warm-up call, before the baseline is read (e.g. drop parameter ``.grad``
    buffers so that a training step's peak counts allocating them).
    """
    if _can_reset_peak():
        fn()  # warm-up: one-time allocations are not the method's working memory
        if reset is not None:
            reset()
        before = _status_kib("VmRSS")
        _can_reset_peak()
        result = fn()
        peak = _status_kib("VmHWM")
        method = "VmHWM after clear_refs, warm-up call first"
    else:
        before = _status_kib("VmRSS")
        result = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        method = "ru_maxrss, no warm-up"
    del result
    return {"peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024, "method": method}


def run_memory_case(
    script: Path, case: str, threads: int, timeout: float = 600, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Run ``python SCRIPT --memory-case CASE [EXTRA]`` in a fresh process; it prints one JSON line last."""
    env = {**os.environ, **MEMORY_ENV}
    done = subprocess.run(
        [sys.executable, str(script), "--memory-case", case, "--threads", str(threads), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory case {case!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_memory_case(
    fn: Callable[[], object], reset: Callable[[], object] | None = None, **extra: Any
) -> None:
    """Body of a ``--memory-case`` child: measure ``fn`` and print the JSON line the parent reads."""
    print(json.dumps({**peak_rss_of_call(fn, reset), **extra}), flush=True)


# -- environment and results ----------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU, and the load when the run started."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpus_visible": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def save_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``bench/results/NAME.json`` (small, meant to be committed) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.summary()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"
