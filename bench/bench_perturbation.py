"""Perturbation methods against Captum 0.9: time of the same computation, each library's default
batching and the same batching; numbers compared too.

Setting: the ResNet-18 layout of ``bench/models.py`` (eval, calibrated BatchNorm) at 64 px, batch 2,
seeded smooth images, targets = arg-max, ``--threads`` (default 1), interleaved rounds.

* Occlusion: window (3, 8, 8), stride 8 (64 windows). Captum's default ``perturbations_per_eval=1``
  runs one forward of N images per window; ours batches windows up to the memory budget.
* FeatureAblation: a 4 x 4 grid of 16 x 16 patches as the feature mask.
* KernelSHAP: the same 16 patches, 200 coalitions (different random coalitions: times only).
* GradientSHAP: 4 reference images, 20 samples per image (different draws: times only).

Usage: ``python bench/bench_perturbation.py [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, interleaved, paired_ratio, pin_threads, save_results
from models import calibrated_resnet18, smooth_images

from bbdecoder import FeatureAblation, GradientSHAP, KernelSHAP, Occlusion


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    import captum.attr as ca

    model = calibrated_resnet18(calibration_size=64)
    x = smooth_images(2, 64, seed=4)
    with torch.no_grad():
        t = model(x).argmax(1)
    targets = [int(v) for v in t]
    cells = torch.arange(64) // 16
    mask = (cells[:, None] * 4 + cells[None, :]).view(1, 1, 64, 64)
    refs = smooth_images(4, 64, seed=9)
    cases: dict[str, dict[str, Any]] = {
        "occlusion_default": {
            "ours": lambda: Occlusion(model).attribute(x, t, sliding_window_shapes=(3, 8, 8), strides=8),
            "captum": lambda: ca.Occlusion(model).attribute(
                x, target=targets, sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8)
            ),
        },
        "occlusion_same_batch_64": {
            "ours": lambda: Occlusion(model, batch_size=128).attribute(
                x, t, sliding_window_shapes=(3, 8, 8), strides=8
            ),
            "captum": lambda: ca.Occlusion(model).attribute(
                x,
                target=targets,
                sliding_window_shapes=(3, 8, 8),
                strides=(3, 8, 8),
                perturbations_per_eval=64,
            ),
        },
        "feature_ablation_default": {
            "ours": lambda: FeatureAblation(model).attribute(x, t, feature_mask=mask),
            "captum": lambda: ca.FeatureAblation(model).attribute(x, target=targets, feature_mask=mask),
        },
        "kernel_shap_200": {
            "ours": lambda: KernelSHAP(model).attribute(x, t, feature_mask=mask, n_samples=200),
            # Captum explains one sample at a time for KernelShap with per-sample masks
            "captum": lambda: torch.cat(
                [
                    ca.KernelShap(model).attribute(
                        x[i : i + 1], target=targets[i], feature_mask=mask, n_samples=200
                    )
                    for i in range(2)
                ]
            ),
        },
        "gradient_shap_20": {
            "ours": lambda: GradientSHAP(model).attribute(x, t, baselines=refs, n_samples=20),
            "captum": lambda: ca.GradientShap(model).attribute(
                x, baselines=refs, target=targets, n_samples=20
            ),
        },
    }
    result: dict[str, Any] = {"environment": environment(), "threads": threads, "timing": {}, "numbers": {}}
    for name, methods in cases.items():
        print(f"{name}: {args.repeats} rounds", flush=True)
        timings = interleaved(methods, repeats=args.repeats, warmup=1)
        ratio = paired_ratio(timings["ours"], timings["captum"])
        result["timing"][name] = {**{k: v.summary() for k, v in timings.items()}, "ours/captum": ratio}
        print(
            f"  ours/captum {ratio['median_of_ratios']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f})",
            flush=True,
        )
    for name in ("occlusion_default", "feature_ablation_default"):
        ours, theirs = cases[name]["ours"](), cases[name]["captum"]()
        result["numbers"][name] = float((ours - theirs).abs().max() / theirs.abs().max())
        print(f"{name}: max |ours - captum| / max |captum| = {result['numbers'][name]:.1e}")
    save_results(f"perturbation_t{threads}", result)


if __name__ == "__main__":
    main()
