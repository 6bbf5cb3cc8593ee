"""Candidate ops for the monitor's per-step gradient statistics, timed on CPU against one
``torch._foreach_norm(grads, 2)`` over the same tensors (the cheapest full read of them).

Tensors: the gradient shapes of the MNIST-sized CNN (1.2M values in 8 tensors, one of 1.18M) and
of the ResNet-18 layout at 32x32 (11.2M in 62), N(0, 1) values. Each op is timed ``--reps`` times,
the ops interleaved; the table gives the minimum **thread CPU time** (``time.thread_time``: on a
shared machine it leaves out the time the process waits for a core) and its ratio to the norm.
``large`` ops run over the tensors with more than ``SMALL`` elements only; ``all`` over every tensor.
Also timed: the monitor's statistics as they were before this change (the exact two-pass path on
every large tensor, the small ones by torch ``index_add_``) and as they are now (``GradStatistics``
on CPU), and the update ratio before (four foreach passes) and now (``UpdateRatios``); the NumPy
candidates (BLAS ``np.dot`` and vectorised ``maximum.reduce`` on 64K-element chunks) and the
previous round's torch-op chunks. The tensors are hot in cache here (the same ones every
repetition); in a training step they arrive cold from the backward pass, see ``bench_monitor.py``.
Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_grad_ops.py --reps 25
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from common import environment, pin_threads, save_results

from bbdecoder.monitor.cpu_reductions import CHUNK, Scratch, moments, update_norms
from bbdecoder.monitor.grad_stats import SMALL, GradStatistics
from bbdecoder.monitor.weights import UpdateRatios


def resnet18_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            ci = cin if block == 0 else cout
            shapes += [(cout, ci, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or ci != cout):
                shapes += [(cout, ci, 1, 1), (cout,), (cout,)]
        cin = cout
    return [*shapes, (10, 512), (10,)]


MNIST = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 9216), (128,), (10, 128), (10,)]


class _Old(GradStatistics):
    """The statistics before: the exact two-pass path for every large tensor, torch small path."""

    def __call__(self, grads: list[torch.Tensor], inv_scale: float = 1.0) -> torch.Tensor:
        return self._device(grads)


class _OldRatios(UpdateRatios):
    """The update ratio before: sub_, norm, copy_, norm over all weights (foreach)."""

    def measure(self, current: list[torch.Tensor], keep: bool = True) -> torch.Tensor:
        assert self._snapshot is not None and self._norms is not None
        torch._foreach_sub_(self._snapshot, current)
        delta = torch.stack(torch._foreach_norm(self._snapshot, 2)).double()
        before = self._norms
        self.remember(current)
        return torch.where(before > 0, delta / torch.where(before > 0, before, 1.0), delta)


def torch_chunk_moments(flat: list[torch.Tensor], buf: torch.Tensor, step: int = 1 << 17) -> torch.Tensor:
    """The previous round's one-read statistics: torch ops on 128K-element chunks (``|g|`` into a
    cached buffer, its ``sum`` and ``amax``, in-place square and ``sum``, the chunk's ``sum``)."""
    partial = []
    for f in flat:
        for start in range(0, f.numel(), step):
            piece = f[start : start + step]
            b = buf[: piece.numel()]
            torch.abs(piece, out=b)
            partial += (b.sum(), b.amax(), piece.sum())
            b.mul_(b)
            partial.append(b.sum())
    return torch.stack(partial)


def numpy_chunks(arrays: list[np.ndarray], op: Callable[[np.ndarray], object]) -> list[object]:
    return [op(a[start : start + CHUNK]) for a in arrays for start in range(0, a.size, CHUNK)]


def candidates(grads: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    large = [g for g in grads if g.numel() > SMALL]
    flat = [g.reshape(-1) for g in large]
    buf = torch.empty(max(g.numel() for g in large))
    weights = [torch.randn(g.shape) for g in grads]
    old_r, new_r = _OldRatios(), UpdateRatios()
    stats_now = GradStatistics()  # one instance, as the analyzer keeps (its scratch buffers)
    old_r.remember(weights)
    new_r.remember(weights)
    zero = torch.zeros(1, 1024)
    arrays = [f.numpy() for f in flat]
    weight_arrays = [w.reshape(-1).numpy() for w in weights if w.numel() > SMALL]
    snapshot_arrays = [a.copy() for a in weight_arrays]
    ones, scratch_chunk, scratch = np.ones(CHUNK, np.float32), np.empty(CHUNK, np.float32), Scratch()

    def dot_ones(piece: np.ndarray) -> object:
        return np.dot(piece, ones[: piece.size])

    def abs_dot(piece: np.ndarray) -> object:
        magnitude = scratch_chunk[: piece.size]
        np.abs(piece, out=magnitude)
        return np.dot(magnitude, ones[: piece.size])

    def rows(g: torch.Tensor) -> torch.Tensor:
        n = g.numel() // 1024 * 1024
        return g.reshape(-1)[:n].view(-1, 1024)

    def cdist(p: float) -> list[torch.Tensor]:
        return [torch.cdist(rows(g), zero, p=p, compute_mode="donot_use_mm_for_euclid_dist") for g in large]

    return {
        "_foreach_norm(all, 2) [reference]": lambda: torch._foreach_norm(grads, 2),
        "_foreach_norm(large, 2)": lambda: torch._foreach_norm(large, 2),
        "_foreach_norm(large, 1)": lambda: torch._foreach_norm(large, 1),
        "_foreach_norm(large, inf)": lambda: torch._foreach_norm(large, float("inf")),
        "_foreach_norm(large, 2, float64)": lambda: torch._foreach_norm(large, 2, dtype=torch.float64),
        "_foreach_max(large)": lambda: torch._foreach_max(large),
        "sum per tensor": lambda: [g.sum() for g in large],
        "amax per tensor": lambda: [g.amax() for g in large],
        "amin per tensor": lambda: [g.amin() for g in large],
        "aminmax per tensor": lambda: [torch.aminmax(g) for g in large],
        "linalg.vector_norm(2) per tensor": lambda: [torch.linalg.vector_norm(g) for g in large],
        "linalg.vector_norm(1) per tensor": lambda: [torch.linalg.vector_norm(g, 1) for g in large],
        "dot(g, g) per tensor": lambda: [torch.dot(f, f) for f in flat],
        "sum(float64) per tensor": lambda: [g.sum(dtype=torch.float64) for g in large],
        "var_mean per tensor": lambda: [torch.var_mean(g, correction=0) for g in large],
        "abs(out=buffer) + sum": lambda: [torch.abs(f, out=buf[: f.numel()]).sum() for f in flat],
        "sub(out=buffer)": lambda: [torch.sub(f, 0.5, out=buf[: f.numel()]) for f in flat],
        "copy_ into buffer": lambda: [buf[: f.numel()].copy_(f) for f in flat],
        "cdist rows p=1": lambda: cdist(1.0),
        "cdist rows p=2": lambda: cdist(2.0),
        "cdist rows p=inf": lambda: cdist(float("inf")),
        "NumPy np.dot(g, g) per 64K chunk": lambda: numpy_chunks(arrays, lambda p: np.dot(p, p)),
        "NumPy np.dot(g, ones) per 64K chunk": lambda: numpy_chunks(arrays, dot_ones),
        "NumPy np.abs(out=chunk) + np.dot(|g|, ones)": lambda: numpy_chunks(arrays, abs_dot),
        "NumPy np.maximum.reduce per 64K chunk": lambda: numpy_chunks(arrays, np.maximum.reduce),
        "four moments, torch ops on 128K chunks (last round)": lambda: torch_chunk_moments(flat, buf),
        "four moments, NumPy on 64K chunks (moments)": lambda: moments(arrays, scratch),
        "update norms, NumPy on 64K chunks (update_norms)": lambda: update_norms(
            weight_arrays, snapshot_arrays, True
        ),
        "six statistics, before (two-pass)": lambda: _Old()(grads),
        "six statistics, now (GradStatistics)": lambda: stats_now(grads),
        "update ratio, before (4 foreach passes)": lambda: old_r.measure(weights),
        "update ratio, now (UpdateRatios)": lambda: new_r.measure(weights),
    }


def measure(name: str, shapes: list[tuple[int, ...]], reps: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    ops = candidates(grads)
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps):
        for key, op in ops.items():
            t = time.thread_time()
            op()
            times[key].append(time.thread_time() - t)
    ref = min(times["_foreach_norm(all, 2) [reference]"][1:])
    size, load = sum(g.numel() for g in grads), os.getloadavg()[0]
    print(f"\n== {name}: {size:,} values in {len(grads)} tensors, load {load:.1f}")
    out = {}
    for key, values in times.items():
        best = min(values[1:])
        out[key] = {"min_cpu_ms": best * 1e3, "over_foreach_norm": best / ref}
        print(f"  {key:<42} {best * 1e3:8.3f} ms {best / ref:7.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pin_threads(args.threads)
    result = {"environment": environment(), "reps": args.reps}
    result["mnist"] = measure("MNIST CNN gradients", MNIST, args.reps)
    result["resnet18"] = measure("ResNet-18 gradients", resnet18_shapes(), args.reps)
    path = save_results(f"grad_ops_t{args.threads}", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
