"""The CAM catalogue against pytorch-grad-cam 1.5.7: map agreement and speed, side by side.

Setting: the ResNet-18-shaped net of ``bench/models.py`` (eval mode, calibrated BatchNorm), seeded smooth
images, layer ``layer4`` (the block output pytorch-grad-cam's docs recommend), targets = each image's
arg-max class, ``--threads`` (default 2). The gradient CAMs and EigenCAM run at 224 px, batch 8; ScoreCAM
and AblationCAM (one forward per channel and image: 512 per image) at ``--perturbation-size`` px
(default 112), batch 1, 32 rows per forward for both libraries.

For each method, in one process on the same model, weights and input, interleaved and rotated:
  ours     ``Cls(model, "layer4").saliency(x, t)`` (constructed once, outside the timing)
  theirs   ``with pytorch_grad_cam.Cls(model, target_layers=[model.layer4]) as cam: cam(x, targets)``
           (a ``with`` block per call, so that its hooks do not stay on the model while ours runs)

Agreement: the largest absolute difference of the two [0, 1] maps. Expected differences: EigenCAM's
sign (theirs is whatever LAPACK returns; ours is fixed, see ``EigenCAM``), and float32 rounding
(pytorch-grad-cam computes in NumPy, resizes with OpenCV).

Runs in the bench venv (``make bench-venv``: torch + torchvision + grad-cam). ``--torchvision-stub``
runs it without torchvision: pytorch-grad-cam imports torchvision's transforms at import time but never
calls them on the CAM path, so empty stand-ins are enough (nothing is installed; only this process sees
them).

Peak memory (``--memory``): each method and library in a fresh process (``--memory-case NAME:LIB``),
the resident-set high-water mark of one call above the resident set before it (after a warm-up call;
``bench/common.py:peak_rss_of_call``). Usage: ``python bench/bench_cams.py [--quick] [--threads N]
[--torchvision-stub] [--memory] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
from models import calibrated_resnet18, smooth_images

import bbdecoder

GRADIENT_METHODS = ("GradCAM", "GradCAMPlusPlus", "HiResCAM", "XGradCAM", "LayerCAM", "EigenCAM")
PERTURBATION_METHODS = ("ScoreCAM", "AblationCAM")


def stub_torchvision() -> None:
    """Empty ``torchvision.transforms`` modules, only where torchvision is not installed."""
    if importlib.util.find_spec("torchvision") is not None:
        return

    def missing(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("torchvision is stubbed in bench_cams.py; install it for this call")

    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in ("Compose", "Normalize", "ToTensor", "Resize"):
        setattr(transforms, name, missing)
    functional.resize = missing  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    root.transforms = transforms  # type: ignore[attr-defined]
    sys.modules.update(
        {
            "torchvision": root,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )


def setup(batch: int, size: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = calibrated_resnet18(seed=0)
    x = smooth_images(batch, size, seed=10)
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, x, targets


def pair(
    name: str, model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, rows: int
) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    kwargs: dict[str, Any] = {"batch_size": rows, "progress": False} if name in PERTURBATION_METHODS else {}
    ours_cam = getattr(bbdecoder, name)(model, "layer4", **kwargs)
    their_cls = getattr(pytorch_grad_cam, name)
    their_targets = [ClassifierOutputTarget(int(t)) for t in targets]

    def ours() -> np.ndarray:
        return ours_cam.saliency(x, targets)[:, 0].detach().numpy()

    def theirs() -> np.ndarray:
        extra = {"batch_size": rows} if name == "AblationCAM" else {}
        with their_cls(model=model, target_layers=[model.layer4], **extra) as cam:
            if name == "ScoreCAM":
                cam.batch_size = rows
            return cam(input_tensor=x, targets=their_targets)

    return ours, theirs


def eigen_sign_check(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """EigenCAM's raw layer maps against ``relu(+-get_2d_projection)``: the best sign per image."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    seen: list[torch.Tensor] = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    theirs = get_2d_projection(seen[0].numpy())
    ours = bbdecoder.EigenCAM(model, "layer4").layer_map(x)[:, 0].numpy()
    same = np.abs(ours - np.maximum(theirs, 0)).reshape(len(ours), -1).max(axis=1)
    other = np.abs(ours - np.maximum(-theirs, 0)).reshape(len(ours), -1).max(axis=1)
    best = np.minimum(same, other)
    return {
        "images": len(ours),
        "sign_differs": int((other < same).sum()),
        "max_abs_diff_best_sign": float(best.max()),
        "max_abs_raw": float(np.abs(ours).max()),
    }


def run(name: str, batch: int, size: int, repeats: int, rows: int) -> dict[str, Any]:
    model, x, targets = setup(batch, size)
    ours, theirs = pair(name, model, x, targets, rows)
    a, b = ours(), theirs()
    per_image = np.abs(a - b).reshape(batch, -1).max(axis=1)
    diff = float(per_image.max())
    print(f"{name}: batch {batch}, {size} px; max |ours - theirs| = {diff:.2e}", flush=True)
    sign = eigen_sign_check(model, x) if name == "EigenCAM" else {}
    if sign:
        print(f"  raw maps up to the component's sign: {sign}", flush=True)
    timings = interleaved({"ours": ours, "theirs": theirs}, repeats=repeats, warmup=1, verbose=False)
    ratio = paired_ratio(timings["theirs"], timings["ours"])
    print(
        f"  ours {timings['ours'].median * 1e3:.0f} ms, theirs {timings['theirs'].median * 1e3:.0f} ms: "
        f"theirs/ours {ratio['median_of_ratios']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f})",
        flush=True,
    )
    return {
        "batch": batch,
        "size": size,
        "max_abs_diff": diff,
        "max_abs_diff_per_image": [float(v) for v in per_image],
        **({"eigen_sign": sign} if sign else {}),
        "ours": timings["ours"].summary(),
        "theirs": timings["theirs"].summary(),
        "theirs/ours": ratio,
    }


def shape_of(name: str, size: int) -> tuple[int, int]:
    return (1, size) if name in PERTURBATION_METHODS else (8, 224)


def memory_case(case: str, perturbation_size: int) -> None:
    name, library = case.split(":")
    batch, size = shape_of(name, perturbation_size)
    model, x, targets = setup(batch, size)
    ours, theirs = pair(name, model, x, targets, rows=32)
    report_memory_case(ours if library == "ours" else theirs, case=case)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--torchvision-stub", action="store_true", help="run without torchvision installed")
    parser.add_argument("--perturbation-size", type=int, default=112, help="px for ScoreCAM/AblationCAM")
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--memory", action="store_true", help="peak memory per call (fresh processes)")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    thread_arg(parser)
    args = parser.parse_args()
    if args.torchvision_stub:
        stub_torchvision()
    import pytorch_grad_cam

    threads = pin_threads(args.threads)
    if args.memory_case:
        memory_case(args.memory_case, args.perturbation_size)
        return
    result: dict[str, Any] = {
        "environment": {
            **environment(),
            "pytorch_grad_cam": getattr(pytorch_grad_cam, "__version__", "1.5.7"),
        },
        "setting": {
            "model": "ResNet-18-shaped (bench/models.py), eval mode, calibrated BN; layer4",
            "threads": threads,
            "targets": "arg-max class per image",
            "torchvision_stub": bool(args.torchvision_stub),
        },
        "methods": {},
    }
    chosen = args.only or [*GRADIENT_METHODS, *PERTURBATION_METHODS]
    stem = f"cams_t{threads}" + ("_memory" if args.memory else "")
    for name in chosen:
        batch, size = shape_of(name, args.perturbation_size)
        if args.memory:
            script = Path(__file__).resolve()
            extra = ["--torchvision-stub"] if args.torchvision_stub else []
            entry = {
                library: run_memory_case(
                    script, f"{name}:{library}", threads, extra=[*extra, "--perturbation-size", str(size)]
                )
                for library in ("ours", "theirs")
            }
            peaks = {library: f"{entry[library]['peak_mib']:.0f}" for library in entry}
            print(f"{name}: peak MiB above the resident set before the call: {peaks}", flush=True)
        else:
            repeats = (2 if args.quick else 5) if name in PERTURBATION_METHODS else (3 if args.quick else 9)
            entry = run(name, batch, size, repeats, rows=32)
        result["methods"][name] = entry
        save_results(stem, result)  # partial results survive a later failure
    path = save_results(stem, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
