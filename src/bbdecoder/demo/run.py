"""The main job on the embedded default: train the digits CNN, explain it, write pictures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bbdecoder.attribution import FullGrad, GradCAM, Gradient, IntegratedGradients, SmoothGrad
from bbdecoder.demo.digits import load_digits_data, train_digits_cnn
from bbdecoder.viz import comparison_grid, overlay, save_figure


@dataclass
class DemoResult:
    """What the demo wrote: ``files`` (paths), ``accuracy`` on the test split, and a metrics dict."""

    out_dir: Path
    accuracy: float
    files: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def run_demo(
    out_dir: str | Path = "runs/demo", *, epochs: int = 4, n_images: int = 6, seed: int = 0
) -> DemoResult:
    """Train the digits CNN, then write FullGrad/IG/SmoothGrad/Grad-CAM/gradient overlays as PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_digits_data(seed=seed)
    model, accuracy = train_digits_cnn(data, epochs=epochs, seed=seed)
    result = DemoResult(out, accuracy)

    images = data.x_test[:n_images]
    labels = data.y_test[:n_images]
    fullgrad = FullGrad(model, im_size=tuple(images.shape[1:]))
    integrated_gradients = IntegratedGradients(model)
    attributions, convergence_delta = integrated_gradients.attribute(
        images, labels, n_steps=64, method="gausslegendre", return_convergence_delta=True
    )
    maps = {
        "FullGrad": fullgrad.saliency(images, labels),
        "Integrated Gradients": attributions.sum(dim=1, keepdim=True),
        "SmoothGrad": SmoothGrad(model, n_samples=32, seed=seed).saliency(images, labels),
        "Grad-CAM": GradCAM(model).saliency(images, labels),
        "Gradient": Gradient(model).attribute(images, labels).sum(dim=1, keepdim=True),
    }
    signed = ["Integrated Gradients", "Gradient"]
    grid = comparison_grid(images, maps, titles=[f"label {int(y)}" for y in labels], signed=signed)
    result.files.append(save_figure(grid, out / "saliency_grid.png"))
    for name, batch in maps.items():
        slug = name.lower().replace(" ", "_").replace("-", "")
        for index in range(n_images):
            picture = overlay(images[index], batch[index], signed=name in signed)
            path = out / "overlays" / f"{slug}_{index}.png"
            path.parent.mkdir(exist_ok=True)
            _save_rgb(picture, path)
            result.files.append(path)

    assert fullgrad.last_relative_error is not None
    result.metrics = {
        "test_accuracy": accuracy,
        "fullgrad_completeness_max_rel_error": float(fullgrad.last_relative_error.max()),
        "ig_convergence_delta_max_abs": float(convergence_delta.abs().max()),
        "seconds": time.perf_counter() - started,
    }
    summary = out / "summary.json"
    summary.write_text(json.dumps(result.metrics, indent=2))
    result.files.append(summary)
    return result


def _save_rgb(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(picture).resize((picture.shape[1] * 16, picture.shape[0] * 16), Image.Resampling.NEAREST).save(path)


__all__ = ["DemoResult", "run_demo"]
