"""Integrated Gradients (50 steps): speed and numbers against Captum 0.9, and peak memory vs chunk size.

Setting: the ResNet-18-shaped net of ``bench/models.py`` (eval mode, calibrated BatchNorm statistics),
seeded smooth images, black (all-zero) baseline, targets = each image's arg-max class,
``--threads`` (default 2).

* Speed: ours ``IntegratedGradients(model).attribute(x, t, baseline="black", n_steps=50, method=M)`` vs
  Captum ``IntegratedGradients(model).attribute(x, baselines=0, target=t, n_steps=50, method=M)``,
  interleaved in one process, each with its own default ``internal_batch_size`` (Captum: all
  N x 50 rows in one pass; ours: as many rows as fit a 512 MiB budget) and with the same explicit one.
* Numbers: for every rule both implement identically (riemann_left/right/middle, gausslegendre), the
  max |ours - captum| relative to max |captum|, in float32 and in float64. Captum's trapezoid weights
  sum to (n-1)/n (a bug we do not copy), so for ``riemann_trapezoid`` we report how far the two differ
  and both convergence deltas instead.
* Memory: peak RSS growth (fresh subprocess per case, see ``common.py``) vs ``internal_batch_size``.

* ResNet-50 (``--resnet50``): each library's default on the ResNet-50 layout at 224 px, one image.

Usage: ``python bench/bench_ig.py [--quick] [--no-memory] [--resnet50]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    environment,
    interleaved,
    paired_ratio,
    pin_threads,
    report_memory_case,
    run_memory_case,
    save_results,
    thread_arg,
)
from models import calibrated_resnet18, resnet50_shaped, smooth_images

from bbdecoder.attribution.integrated_gradients import IntegratedGradients

N_STEPS = 50
SHARED_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "gausslegendre")
NUMBERS_TOLERANCE = 1e-5
# (name, image size, batch, internal_batch_size or None for each library's default)
SPEED_CASES = (
    ("64px_b2_default", 64, 2, None),
    ("64px_b2_ibs20", 64, 2, 20),
    ("112px_b1_default", 112, 1, None),
)
MEMORY_IMAGE, MEMORY_BATCH = 64, 2
MEMORY_CHUNKS = (None, 10, 20, 50, 100)


def setup(
    size: int, batch: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = calibrated_resnet18(seed=0, calibration_size=size, calibration_batch=8).to(dtype)
    x = smooth_images(batch, size, seed=10, dtype=dtype)
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, x, targets


def ours_fn(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    method: str,
    internal_batch_size: int | None,
) -> Callable[[], torch.Tensor]:
    explainer = IntegratedGradients(model)
    return lambda: explainer.attribute(
        x, targets, baseline="black", n_steps=N_STEPS, method=method, internal_batch_size=internal_batch_size
    )


def captum_fn(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    method: str,
    internal_batch_size: int | None,
) -> Callable[[], torch.Tensor]:
    from captum.attr import IntegratedGradients as CaptumIG

    explainer = CaptumIG(model)
    target_list = [int(t) for t in targets]
    return lambda: explainer.attribute(
        x,
        baselines=0.0,
        target=target_list,
        n_steps=N_STEPS,
        method=method,
        internal_batch_size=internal_batch_size,
    )


def brute_force_ig(
    model: torch.nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    alphas: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The oracle: one forward+backward per node, black baseline, weighted sum in node order."""
    total = torch.zeros_like(x)
    for alpha, weight in zip(alphas.tolist(), weights.tolist(), strict=True):
        point = (alpha * x).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point).gather(1, targets[:, None]).sum(), point)
        total += weight * grad
    return x * total


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def numbers(size: int = 64, batch: int = 2) -> dict[str, Any]:
    """Max |ours - captum| / max |captum| per rule in float32 and float64, and float64 brute-force oracles.

    Captum builds its nodes with float32 ``torch.linspace`` and casts its weights to float32 even for
    float64 inputs, so in float64 each library is compared with a brute-force loop over *its own* nodes.
    """
    from captum.attr._utils.approximation_methods import approximation_parameters

    from bbdecoder.attribution.quadrature import quadrature

    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.float64):
        model, x, targets = setup(size, batch, dtype)
        per_method: dict[str, Any] = {}
        for method in (*SHARED_METHODS, "riemann_trapezoid"):
            ours = ours_fn(model, x, targets, method, None)()
            theirs = captum_fn(model, x, targets, method, None)()
            entry: dict[str, float] = {"ours_vs_captum": _rel(ours, theirs)}
            if dtype == torch.float64 and method in SHARED_METHODS:
                alphas, weights = quadrature(method, N_STEPS)
                step_sizes, captum_alphas = approximation_parameters(method)
                entry["ours_vs_oracle_own_nodes"] = _rel(
                    ours, brute_force_ig(model, x, targets, alphas, weights)
                )
                entry["captum_vs_oracle_captum_nodes"] = _rel(
                    theirs,
                    brute_force_ig(
                        model,
                        x,
                        targets,
                        torch.tensor(captum_alphas(N_STEPS), dtype=torch.float64),
                        torch.tensor(step_sizes(N_STEPS)).float().double(),
                    ),
                )
                entry["captum_node_max_shift"] = float(
                    (torch.tensor(captum_alphas(N_STEPS), dtype=torch.float64) - alphas).abs().max()
                )
            per_method[method] = entry
        out[str(dtype).replace("torch.", "")] = per_method
    model, x, targets = setup(size, batch, torch.float64)
    from captum.attr import IntegratedGradients as CaptumIG

    _, our_delta = IntegratedGradients(model).attribute(
        x, targets, n_steps=N_STEPS, method="riemann_trapezoid", return_convergence_delta=True
    )
    captum_attr, captum_delta = CaptumIG(model).attribute(
        x,
        baselines=0.0,
        target=[int(t) for t in targets],
        n_steps=N_STEPS,
        method="riemann_trapezoid",
        return_convergence_delta=True,
    )
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, targets[:, None]).squeeze(1)
    out["riemann_trapezoid_float64"] = {
        "F(x)-F(baseline)": gap.tolist(),
        "ours_convergence_delta": our_delta.tolist(),
        "captum_convergence_delta": captum_delta.tolist(),
        "captum_sum_over_ours_sum": (captum_attr.flatten(1).sum(1) / (gap + our_delta)).tolist(),
        "expected_captum_weight_sum": (N_STEPS - 1) / N_STEPS,
    }
    float32 = [out["float32"][m]["ours_vs_captum"] for m in SHARED_METHODS]
    oracle = [
        out["float64"][m][k]
        for m in SHARED_METHODS
        for k in ("ours_vs_oracle_own_nodes", "captum_vs_oracle_captum_nodes")
    ]
    out["float32_shared_rules_max_rel_diff"] = max(float32)
    out["float32_shared_rules_within_1e-5"] = max(float32) <= NUMBERS_TOLERANCE
    out["float64_oracles_max_rel_diff"] = max(oracle)
    return out


def memory_case(case: str, threads: int) -> None:
    library, chunk = case.split(":")
    internal_batch_size = None if chunk == "default" else int(chunk)
    pin_threads(threads)
    model, x, targets = setup(MEMORY_IMAGE, MEMORY_BATCH)
    make = ours_fn if library == "ours" else captum_fn
    report_memory_case(make(model, x, targets, "gausslegendre", internal_batch_size), case=case)


def resnet50_default_case(threads: int, repeats: int) -> dict[str, Any]:
    """Each library's default on the ResNet-50 layout at 224 px, one image, 50 steps (issue 11).

    Captum runs the 50 rows in one pass (about 4.3 GiB of activations); ours takes as many rows as the
    default budget and the CPU pass target allow.
    """
    from bbdecoder.attribution.memory import default_memory_budget, rows_for_budget

    model = resnet50_shaped()
    x = smooth_images(1, 224, seed=10)
    with torch.no_grad():
        targets = model(x).argmax(1)
    explainer = IntegratedGradients(model)
    with explainer.session():
        rows = rows_for_budget(explainer, x, default_memory_budget(x.device))
    print(f"IG resnet50 224px b1: our default rows per pass = {rows}; {repeats} rounds", flush=True)
    timings = interleaved(
        {
            "ours": ours_fn(model, x, targets, "gausslegendre", None),
            "captum": captum_fn(model, x, targets, "gausslegendre", None),
        },
        repeats=repeats,
        warmup=1,
    )
    ratio = paired_ratio(timings["ours"], timings["captum"])
    print(f"  ours/captum: {ratio['median_of_ratios']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f})")
    return {
        "environment": environment(),
        "threads": threads,
        "our_rows_per_pass": rows,
        "captum_rows_per_pass": N_STEPS,
        **{k: t.summary() for k, t in timings.items()},
        "ours/captum": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--resnet50", action="store_true", help="only each library's default on ResNet-50 at 224 px"
    )
    thread_arg(parser)
    args = parser.parse_args()
    if args.memory_case:
        memory_case(args.memory_case, args.threads)
        return

    threads = pin_threads(args.threads)
    if args.resnet50:
        result_50 = resnet50_default_case(threads, 2 if args.quick else 3)
        print(f"results: {save_results(f'integrated_gradients_resnet50_t{threads}', result_50)}")
        return
    result: dict[str, Any] = {
        "environment": environment(),
        "setting": {
            "model": "ResNet-18-shaped (bench/models.py), eval mode, calibrated BN",
            "n_steps": N_STEPS,
            "baseline": "black (zeros)",
            "method_timed": "gausslegendre",
            "threads": threads,
        },
        "timing": {},
    }
    repeats = 2 if args.quick else 7
    for name, size, batch, chunk in SPEED_CASES:
        print(
            f"IG {name}: {size}x{size}, batch {batch}, internal_batch_size={chunk}, {repeats} rounds",
            flush=True,
        )
        model, x, targets = setup(size, batch)
        timings = interleaved(
            {
                "ours": ours_fn(model, x, targets, "gausslegendre", chunk),
                "captum": captum_fn(model, x, targets, "gausslegendre", chunk),
            },
            repeats=repeats,
            warmup=1,
        )
        ratio = paired_ratio(timings["ours"], timings["captum"])
        result["timing"][name] = {
            "size": size,
            "batch": batch,
            "internal_batch_size": chunk,
            **{k: t.summary() for k, t in timings.items()},
            "ours/captum": ratio,
        }
        print(f"  ours/captum: {ratio['median_of_ratios']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f})")
    worst = max(entry["ours/captum"]["median_of_ratios"] for entry in result["timing"].values())
    result["targets"] = {"ours/captum <= 1.0": {"worst": worst, "met": worst <= 1.0}}

    print("IG numbers vs Captum (float32 and float64) ...", flush=True)
    save_results(f"integrated_gradients_t{threads}", result)  # partial results survive a later failure
    result["numbers"] = numbers()
    save_results(f"integrated_gradients_t{threads}", result)

    if not args.no_memory:
        result["peak_memory_mib"] = {
            "image": MEMORY_IMAGE,
            "batch": MEMORY_BATCH,
            "rows": MEMORY_BATCH * N_STEPS,
            "cases": {},
        }
        script = Path(__file__).resolve()
        for chunk in MEMORY_CHUNKS:
            for library in ("ours", "captum"):
                case = f"{library}:{'default' if chunk is None else chunk}"
                print(f"  peak memory {case} (fresh subprocess) ...", flush=True)
                result["peak_memory_mib"]["cases"][case] = run_memory_case(script, case, threads)

    path = save_results(f"integrated_gradients_t{threads}", result)
    print_summary(result)
    print(f"results: {path}")


def print_summary(result: dict[str, Any]) -> None:
    print("\n== Integrated Gradients summary ==")
    for name, entry in result["timing"].items():
        print(
            f"{name}: ours {entry['ours']['median_s'] * 1e3:.0f} ms, "
            f"captum {entry['captum']['median_s'] * 1e3:.0f} ms,"
            f" ours/captum {entry['ours/captum']['median_of_ratios']:.2f}x"
        )
    verdict = result["targets"]["ours/captum <= 1.0"]
    print(
        f"target ours/captum <= 1.0: worst {verdict['worst']:.2f} -> {'met' if verdict['met'] else 'MISSED'}"
    )
    nums = result["numbers"]
    print(
        f"float32, shared rules, max rel diff vs captum: {nums['float32_shared_rules_max_rel_diff']:.1e} "
        f"({'within' if nums['float32_shared_rules_within_1e-5'] else 'NOT within'} 1e-5); float64, each vs "
        f"a brute-force loop over its own nodes: {nums['float64_oracles_max_rel_diff']:.1e}"
    )
    for case, mem in result.get("peak_memory_mib", {}).get("cases", {}).items():
        print(f"peak memory {case}: {mem['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
