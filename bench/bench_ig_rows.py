"""Where IG's time goes: seconds per row (one path point) of one forward+backward pass vs rows per pass.

For the ResNet-50 layout (``bench/models.py``) and the ResNet-18 layout, at several resolutions and
thread counts, one pass of ``r`` rows (input gradient of one logit per row, as IG computes it) is timed
for r in ROWS, interleaved round by round; the result is the median seconds per row and each r's ratio
to the best r. Also records what our memory estimator predicts per row, and the rows the default
512 MiB budget gives. This is the study behind the default rows per pass (BENCHMARKS.md).

Usage: ``python bench/bench_ig_rows.py [--threads 1] [--sizes 224,112] [--rows 1,2,4,8,16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, interleaved, pin_threads, report_memory_case, run_memory_case, save_results
from models import calibrated_resnet18, resnet50_shaped, smooth_images

from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.attribution.memory import DEFAULT_CPU_BUDGET_BYTES, activation_bytes_per_row


def one_pass(model: torch.nn.Module, x: torch.Tensor) -> Any:
    def run() -> None:
        point = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point)[:, 0].sum(), point)
        del grad

    return run


def _model(name: str) -> torch.nn.Module:
    return resnet50_shaped() if name == "resnet50" else calibrated_resnet18(calibration_size=64)


def memory_case(case: str, threads: int) -> None:
    """Child process: peak RSS growth of one forward+backward pass of ``rows`` rows."""
    name, size, rows = case.split(":")
    pin_threads(threads)
    model = _model(name)
    images = smooth_images(int(rows), int(size), seed=3)
    explainer = IntegratedGradients(model)
    with explainer.session():
        estimate = activation_bytes_per_row(explainer, images[:1])
    report_memory_case(one_pass(model, images), case=case, estimate_mib_per_row=estimate / 2**20)


def memory_study(cases: list[str], threads: int) -> dict[str, Any]:
    """Measured peak MiB per row against the estimator's deduplicated leaf-output bytes per row."""
    out: dict[str, Any] = {}
    for case in cases:
        rows = int(case.split(":")[2])
        measured = run_memory_case(Path(__file__).resolve(), case, threads)
        per_row = measured["peak_mib"] / rows
        out[case] = {
            **measured,
            "measured_mib_per_row": per_row,
            "measured_over_estimate": per_row / measured["estimate_mib_per_row"],
        }
        print(
            f"  {case}: {per_row:.0f} MiB/row measured, {measured['estimate_mib_per_row']:.0f} estimated "
            f"({out[case]['measured_over_estimate']:.2f}x)",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="224")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--memory", default="", help="cases model:size:rows,... measured in fresh processes")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        memory_case(args.memory_case, args.threads)
        return
    if args.memory:
        result = {"environment": environment(), "memory": memory_study(args.memory.split(","), args.threads)}
        save_results(f"ig_rows_memory_t{args.threads}", result)
        return
    threads = pin_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    out: dict[str, Any] = {"environment": environment(), "threads": threads, "cases": {}}
    for model_name in args.models.split(","):
        model = _model(model_name)
        for size in (int(s) for s in args.sizes.split(",")):
            images = smooth_images(max(rows), size, seed=3)
            explainer = IntegratedGradients(model)
            with explainer.session():
                per_row_bytes = activation_bytes_per_row(explainer, images[:1])
            print(
                f"{model_name} {size}px, {threads} thread(s): new leaf outputs "
                f"{per_row_bytes / 2**20:.0f} MiB/row"
            )
            timings = interleaved(
                {f"r{r}": one_pass(model, images[:r]) for r in rows}, repeats=args.repeats, warmup=1
            )
            per_row = {r: timings[f"r{r}"].median / r for r in rows}
            best = min(per_row.values())
            out["cases"][f"{model_name}_{size}"] = {
                "leaf_output_mib_per_row": per_row_bytes / 2**20,
                "seconds_per_row": per_row,
                "relative_to_best": {r: v / best for r, v in per_row.items()},
                "raw": {k: t.summary() for k, t in timings.items()},
                "default_budget_rows": max(1, int(DEFAULT_CPU_BUDGET_BYTES // (1.5 * per_row_bytes))),
            }
            for r in rows:
                print(f"  r={r:3d}: {per_row[r] * 1e3:7.1f} ms/row  ({per_row[r] / best:.2f}x best)")
    save_results(f"ig_rows_{args.models}_{args.sizes}_t{threads}".replace(",", "-"), out)


if __name__ == "__main__":
    main()
