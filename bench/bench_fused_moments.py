"""Would a fused kernel make the monitor's statistics cheaper? An inductor-compiled single pass of
the four moments (``sum g``, ``sum |g|``, ``max |g|``, ``sum g^2``) against the NumPy chunks the
monitor uses (:func:`bbdecoder.monitor.cpu_reductions.moments`) and one ``torch._foreach_norm``,
on the gradients of the ``bench_monitor.py`` models just after their backward pass (cold, as
``Analyzer.step()`` sees them). The compiled function accumulates in float64 (exact) or, with
``--float32``, in float32. Thread CPU time, medians of interleaved rounds, 1 thread. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_fused_moments.py --models mnist,bert
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor import _workload
from common import environment, pin_threads, save_results

from bbdecoder.monitor.cpu_reductions import Scratch, moments
from bbdecoder.monitor.grad_stats import TINY


def four_moments(x: torch.Tensor, float64: bool) -> torch.Tensor:
    d = x.double() if float64 else x
    magnitude = d.abs()
    return torch.stack([d.sum(), magnitude.sum(), magnitude.amax(), (d * d).sum()])


def measure(name: str, rounds: int, float64: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model, make_opt, (x, y), loss_fn = _workload(name)
    opt = make_opt(model)
    params = [p for p in model.parameters() if p.numel() > TINY]
    fused = torch.compile(lambda g: four_moments(g, float64), dynamic=True)
    start = time.perf_counter()
    loss_fn(model(x), y).backward()
    for p in params:
        assert p.grad is not None
        fused(p.grad.view(-1))
    compile_s = time.perf_counter() - start
    scratch = Scratch()
    ops = {
        "foreach_norm": lambda gs: torch._foreach_norm(gs, 2),
        "numpy_chunks": lambda gs: moments([g.view(-1).numpy() for g in gs], scratch),
        "fused_compiled": lambda gs: [fused(g.view(-1)) for g in gs],
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for key, op in ops.items():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            grads = [p.grad for p in params if p.grad is not None]
            t = time.thread_time()
            op(grads)
            times[key].append(time.thread_time() - t)
            opt.step()
    out = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
    out["compile_s"] = compile_s
    norm = out["foreach_norm_ms"]
    print(
        f"== {name}: norm {norm:.3f} ms; NumPy chunks {out['numpy_chunks_ms'] / norm:.2f}x; "
        f"fused compiled ({'float64' if float64 else 'float32'}) {out['fused_compiled_ms'] / norm:.2f}x; "
        f"compile {compile_s:.1f} s"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mnist,bert")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--float32", action="store_true", help="accumulate in float32 in the fused kernel")
    args = parser.parse_args()
    pin_threads(1)
    result: dict[str, object] = {"environment": environment(), "float64": not args.float32}
    for name in args.models.split(","):
        result[name] = measure(name, args.rounds, not args.float32)
    print(f"wrote {save_results('fused_moments_t1' + ('_f32' if args.float32 else ''), result)}")


if __name__ == "__main__":
    main()
