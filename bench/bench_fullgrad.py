"""FullGrad saliency: speed against a plain forward+backward and pytorch-grad-cam, map agreement, memory.

Setting: the ResNet-18-shaped net of ``bench/models.py`` (eval mode, calibrated BatchNorm statistics),
seeded smooth 224x224 images, batch 1 and 8, targets = each image's arg-max class, ``--threads`` (default 2).

Methods, interleaved in one process on the same model, weights and input:
  plain        ``model.zero_grad(); model(x)[range(N), t].sum().backward()`` (param grads, as in training)
  input_grad   one forward + ``autograd.grad(score, x)`` (what any gradient method needs at least)
  ours         ``FullGrad(model, im_size=(3, 224, 224)).saliency(x, t)`` (constructed once, outside)
  gradcam      ``pytorch_grad_cam.FullGrad(model, target_layers=[])(x, targets)`` constructed in a ``with``
               block per call so that its hooks do not stay on the model while the others run (the
               construction alone is timed separately and is negligible).

Usage: ``python bench/bench_fullgrad.py [--quick] [--no-profile] [--no-memory] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

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
from models import calibrated_resnet18, smooth_images

from bbdecoder.attribution.fullgrad import FullGrad

IMAGE = (3, 224, 224)
TARGET_VS_PLAIN = 1.3
TARGET_VS_GRADCAM = 6.0


# -- the methods ----------------------------------------------------------------------------------
def setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = calibrated_resnet18(seed=0)
    x = smooth_images(batch, IMAGE[1], seed=10)
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, x, targets


def plain_step(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.gather(1, targets[:, None]).sum().backward()


def input_grad_step(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().requires_grad_(True)
    out = model(leaf)
    (grad,) = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), leaf)
    return grad


def gradcam_fullgrad(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    from pytorch_grad_cam import FullGrad as GradCamFullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCamFullGrad(model, target_layers=[]) as cam:
        return cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def methods_for(
    model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> dict[str, Callable[[], Any]]:
    ours = FullGrad(model, im_size=IMAGE)
    return {
        "plain": lambda: plain_step(model, x, targets),
        "input_grad": lambda: input_grad_step(model, x, targets),
        "ours": lambda: ours.saliency(x, targets),
        "gradcam": lambda: gradcam_fullgrad(model, x, targets),
    }


# -- agreement ------------------------------------------------------------------------------------
def _rank(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    # average ranks of ties, as Spearman's rho requires
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    for group in np.split(np.arange(len(values)), boundaries):
        if len(group) > 1:
            ranks[order[group]] = ranks[order[group]].mean()
    return ranks


def correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of two maps (flattened)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "spearman": float(np.corrcoef(_rank(a), _rank(b))[0, 1]),
    }


def paper_fullgrad_oracle(
    x: torch.Tensor, input_grad: torch.Tensor, bias_grads: list[torch.Tensor]
) -> torch.Tensor:
    """FullGrad as written in the paper, the slow way, in float64: psi(|.|) per sample over (C, H, W),
    every channel upsampled (bilinear, align_corners=True) *before* the channel sum."""

    def psi(v: torch.Tensor) -> torch.Tensor:
        flat = v.abs().flatten(1)
        low, high = flat.min(1).values, flat.max(1).values
        shape = (-1, 1, 1, 1)
        return (v.abs() - low.view(shape)) / (high - low + 1e-6).view(shape)

    x, input_grad = x.double(), input_grad.double()
    total = psi(x * input_grad).sum(1, keepdim=True)
    for bias_grad in bias_grads:
        up = F.interpolate(psi(bias_grad.double()), size=x.shape[2:], mode="bilinear", align_corners=True)
        total = total + up.sum(1, keepdim=True)
    return total


def gradcam_internals(
    model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> tuple[np.ndarray, list[str], list[torch.Tensor]]:
    """pytorch-grad-cam's map (N, H, W), its bias layers' names, and its bias-gradients
    ``bias * dF/d output``, each paired (by grad-cam, by order) with its layer."""
    from pytorch_grad_cam import FullGrad as GradCamFullGrad
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    names = {module: name for name, module in model.named_modules()}
    with GradCamFullGrad(model, target_layers=[]) as cam:
        cam_map = cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        layers = [names[m] for m in cam.target_layers]
        bias_grads = [
            torch.from_numpy(bias[None, :, None, None] * grad.numpy())
            for bias, grad in zip(cam.bias_data, cam.activations_and_grads.gradients, strict=True)
        ]
    return cam_map, layers, bias_grads


def raw_difference(ours: dict[str, torch.Tensor], layers: list[str], theirs: list[torch.Tensor]) -> float:
    """Worst per-layer max|ours - theirs| / max|theirs| over the layers both see."""
    return max(
        float((ours[name] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        for name, g in zip(layers, theirs, strict=True)
    )


def agreement(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """How our map relates to the paper's definition and to pytorch-grad-cam's map."""
    from pytorch_grad_cam.utils.image import scale_accross_batch_and_channels, scale_cam_image

    ours = FullGrad(model, im_size=IMAGE)
    our_map = ours.saliency(x, targets)[:, 0]
    completeness = float(ours.last_relative_error.max())  # type: ignore[union-attr]
    cam_map, cam_layers, cam_bias_grads = gradcam_internals(model, x, targets)
    decomposition = ours.decompose(x, targets)
    ours_by_layer = dict(zip(decomposition.layer_names, decomposition.bias_gradients, strict=True))
    input_grad_diff = float((decomposition.input_gradient - input_grad_step(model, x, targets)).abs().max())

    # The paper's definition, computed the slow way in float64 from grad-cam's captured gradients.
    oracle = paper_fullgrad_oracle(x, decomposition.input_gradient, cam_bias_grads)[:, 0]
    oracle_rel = float(((our_map.double() - oracle).abs().amax((1, 2)) / oracle.amax((1, 2))).max())

    # grad-cam's post-processing (per-channel min-max, cv2 resize, final min-max) applied to *our*
    # decomposition: if the maps differ only by post-processing, this reproduces grad-cam's map.
    size = (x.shape[3], x.shape[2])
    input_part = (decomposition.inputs * decomposition.input_gradient).numpy()
    parts = [scale_accross_batch_and_channels(np.abs(input_part), size)]
    for name in cam_layers:
        layer = scale_accross_batch_and_channels(np.abs(ours_by_layer[name].numpy()), size)
        parts.append(layer.sum(1, keepdims=True))
    reprocessed = scale_cam_image(np.concatenate(parts, axis=1).sum(1))

    # Same function, projection shortcut executed before the main branch: grad-cam pairs gradients
    # with layers by order, we pair them by module.
    swapped = calibrated_resnet18(seed=0, downsample_first=True)
    x1, t1 = x[:1], targets[:1]
    swapped_map, swapped_layers, swapped_grads = gradcam_internals(swapped, x1, t1)
    swapped_ours = FullGrad(swapped, im_size=IMAGE)
    swapped_decomposition = swapped_ours.decompose(x1, t1)
    swapped_by_layer = dict(
        zip(swapped_decomposition.layer_names, swapped_decomposition.bias_gradients, strict=True)
    )
    n = x.shape[0]
    per_image = [correlations(our_map[i].numpy(), cam_map[i]) for i in range(n)]
    oracle_corr = [correlations(our_map[i].numpy(), oracle[i].numpy()) for i in range(n)]
    return {
        "images": n,
        "bias_layers_gradcam": len(cam_layers),
        "bias_layers_ours": len(decomposition.layer_names),
        "completeness_rel_error_max": completeness,
        "raw_bias_gradients_max_rel_diff_vs_gradcam": raw_difference(
            ours_by_layer, cam_layers, cam_bias_grads
        ),
        "input_gradient_max_abs_diff": input_grad_diff,
        "ours_vs_paper_oracle_float64_max_rel_diff": oracle_rel,
        "ours_vs_paper_oracle_pearson_min": min(c["pearson"] for c in oracle_corr),
        "ours_vs_gradcam_pearson": _spread([c["pearson"] for c in per_image]),
        "ours_vs_gradcam_spearman": _spread([c["spearman"] for c in per_image]),
        "gradcam_postprocessing_on_our_decomposition_vs_gradcam_max_abs_diff": float(
            np.abs(reprocessed - cam_map).max()
        ),
        "downsample_first_variant": {
            "raw_bias_gradients_max_rel_diff_vs_gradcam": raw_difference(
                swapped_by_layer, swapped_layers, swapped_grads
            ),
            "ours_completeness_rel_error": swapped_ours.checkCompleteness(x1),
            "ours_vs_gradcam_map": correlations(swapped_ours.saliency(x1, t1)[0, 0].numpy(), swapped_map[0]),
        },
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- profile --------------------------------------------------------------------------------------
def profile(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, rows: int = 15) -> dict[str, Any]:
    """Self CPU time per op (ms per call) for ours and plain, averaged over a few profiled calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    methods = methods_for(model, x, targets)
    calls = 3
    out: dict[str, Any] = {}
    for name in ("plain", "input_grad", "ours"):
        methods[name]()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                methods[name]()
        averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        out[name] = {
            "total_ms_per_call": sum(e.self_cpu_time_total for e in averages) / 1e3 / calls,
            "top_self_cpu_ms_per_call": {
                e.key: round(e.self_cpu_time_total / 1e3 / calls, 2) for e in averages[:rows]
            },
        }
    return out


# -- memory ---------------------------------------------------------------------------------------
def memory_case(case: str, threads: int) -> None:
    name, batch = case.rsplit("-b", 1)
    pin_threads(threads)
    model, x, targets = setup(int(batch))
    fn = methods_for(model, x, targets)[name]
    report_memory_case(fn, reset=lambda: model.zero_grad(set_to_none=True), case=case)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    thread_arg(parser)
    args = parser.parse_args()
    if args.memory_case:
        memory_case(args.memory_case, args.threads)
        return

    threads = pin_threads(args.threads)
    result: dict[str, Any] = {
        "environment": environment(),
        "setting": {
            "model": "ResNet-18-shaped (bench/models.py), eval mode, calibrated BN",
            "image": list(IMAGE),
            "threads": threads,
            "targets": "arg-max class per image",
        },
        "timing": {},
    }
    plan = {1: (4 if args.quick else 15), 8: (2 if args.quick else 7)}
    profile_model: tuple[torch.nn.Module, torch.Tensor, torch.Tensor] | None = None
    for batch, repeats in plan.items():
        print(f"FullGrad, batch {batch}, {repeats} interleaved rounds", flush=True)
        model, x, targets = setup(batch)
        timings = interleaved(methods_for(model, x, targets), repeats=repeats, warmup=1)
        entry = {name: t.summary() for name, t in timings.items()}
        entry["ratios"] = {
            "ours/plain": paired_ratio(timings["ours"], timings["plain"]),
            "ours/input_grad": paired_ratio(timings["ours"], timings["input_grad"]),
            "gradcam/ours": paired_ratio(timings["gradcam"], timings["ours"]),
            "gradcam/plain": paired_ratio(timings["gradcam"], timings["plain"]),
        }
        result["timing"][f"batch{batch}"] = entry
        for key, ratio in entry["ratios"].items():
            print(f"  {key}: {ratio['median_of_ratios']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f})")
        if batch == 8:
            profile_model = (model, x, targets)
            print("  agreement with the paper's definition and with pytorch-grad-cam ...", flush=True)
            result["agreement"] = agreement(model, x, targets)
        save_results(f"fullgrad_t{threads}", result)  # partial results survive a later failure

    assert profile_model is not None
    gradcam_ctor = interleaved(
        {"gradcam_construct_only": lambda: _construct_gradcam(profile_model[0])},
        repeats=5,
        warmup=1,
        verbose=False,
    )
    result["gradcam_construction_median_s"] = gradcam_ctor["gradcam_construct_only"].median
    worst = max(result["timing"][k]["ratios"]["ours/plain"]["median_of_ratios"] for k in result["timing"])
    best_vs_cam = min(
        result["timing"][k]["ratios"]["gradcam/ours"]["median_of_ratios"] for k in result["timing"]
    )
    result["targets"] = {
        f"ours/plain <= {TARGET_VS_PLAIN}": {"worst": worst, "met": worst <= TARGET_VS_PLAIN},
        f"gradcam/ours >= {TARGET_VS_GRADCAM}": {
            "worst": best_vs_cam,
            "met": best_vs_cam >= TARGET_VS_GRADCAM,
        },
    }
    if not args.no_profile:
        print("  profiling (torch.profiler, batch 8) ...", flush=True)
        result["profile_batch8"] = profile(*profile_model)
        save_results(f"fullgrad_t{threads}", result)

    if not args.no_memory:
        result["peak_memory_mib"] = {}
        script = Path(__file__).resolve()
        for case in ("plain-b8", "input_grad-b8", "ours-b8", "gradcam-b8"):
            print(f"  peak memory {case} (fresh subprocess) ...", flush=True)
            result["peak_memory_mib"][case] = run_memory_case(script, case, threads)

    path = save_results(f"fullgrad_t{threads}", result)
    print_summary(result)
    print(f"results: {path}")


def _construct_gradcam(model: torch.nn.Module) -> None:
    from pytorch_grad_cam import FullGrad as GradCamFullGrad

    with GradCamFullGrad(model, target_layers=[]):
        pass


def print_summary(result: dict[str, Any]) -> None:
    print("\n== FullGrad summary ==")
    for key, entry in result["timing"].items():
        line = ", ".join(
            f"{m} {entry[m]['median_s'] * 1e3:.0f} ms" for m in ("plain", "input_grad", "ours", "gradcam")
        )
        ratios = entry["ratios"]
        print(
            f"{key}: {line}; ours/plain {ratios['ours/plain']['median_of_ratios']:.2f}x, "
            f"gradcam/ours {ratios['gradcam/ours']['median_of_ratios']:.1f}x"
        )
    for name, verdict in result["targets"].items():
        print(f"target {name}: worst {verdict['worst']:.2f} -> {'met' if verdict['met'] else 'MISSED'}")
    if "agreement" in result:
        a = result["agreement"]
        print(
            f"ours vs grad-cam map: Pearson median {a['ours_vs_gradcam_pearson']['median']:.3f}, "
            f"Spearman median {a['ours_vs_gradcam_spearman']['median']:.3f}; raw bias-gradients max rel diff "
            f"{a['raw_bias_gradients_max_rel_diff_vs_gradcam']:.1e}; ours vs float64 paper oracle "
            "max rel diff "
            f"{a['ours_vs_paper_oracle_float64_max_rel_diff']:.1e}"
        )
    for case, mem in result.get("peak_memory_mib", {}).items():
        print(f"peak memory {case}: {mem['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
