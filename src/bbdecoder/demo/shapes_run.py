"""The shapes part of the demo: train :class:`~bbdecoder.demo.shapes.ShapesCNN` on the generated set,
explain test images, score the maps against the object masks and check them against two baselines.

The check: FullGrad, Integrated Gradients and Grad-CAM must beat a random map and an edge detector
on the pointing game and on the energy inside the mask (means over the scored test images). Every
number goes into the run store (section ``metrics``), the overlays into section ``saliency``, so the
report shows them; the model is saved as TorchScript and as a state_dict, sample images as PNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bbdecoder.attribution.registry import get_method
from bbdecoder.demo.localization import localization_scores, random_maps, sobel_edges
from bbdecoder.demo.shapes import CLASSES, ShapesData, make_shapes_data, shapes_accuracy, train_shapes_cnn
from bbdecoder.progress import progress_bar, stage
from bbdecoder.report.blobs import figure_png, store_image, store_table
from bbdecoder.store.writer import RunWriter
from bbdecoder.viz import comparison_grid

CHECKED = ("FullGrad", "Integrated Gradients", "Grad-CAM")
BASELINES = ("random map", "Sobel edges")
SCORES = ("pointing", "energy", "attention_iou")
MODEL_FILE = "shapes_cnn.pt"
STATE_DICT_FILE = "shapes_cnn_state_dict.pt"


@dataclass
class ShapesSettings:
    """Sizes of the shapes part; :meth:`quick` is the reduced setting of the tests."""

    n_train: int = 2500
    n_test: int = 500
    epochs: int = 6
    n_eval: int = 64
    n_show: int = 4
    ig_steps: int = 32
    seed: int = 0

    @classmethod
    def quick(cls) -> ShapesSettings:
        return cls(n_train=800, n_test=100, epochs=3, n_eval=16, n_show=2, ig_steps=8)


@dataclass
class ShapesResult:
    """Test accuracy, the score table (one row per method), the check and the files written."""

    accuracy: float
    table: pd.DataFrame
    passed: bool
    files: list[Path] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the demo summary: ``shapes_<method>_<score>`` and the check (1.0 = passed)."""
        out = {"shapes_test_accuracy": self.accuracy}
        for row in self.table.itertuples():
            for score in SCORES:
                out[f"shapes_{_slug(str(row.method))}_{score}"] = float(getattr(row, score))
        out["shapes_explanations_beat_baselines"] = float(self.passed)
        return out


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "")


def shapes_explainers(model: nn.Module, ig_steps: int = 32) -> dict[str, Callable]:
    """Method title -> ``f(images, labels) -> (N, 1, H, W)`` non-negative maps (IG: |sum over colours|),
    built from the method registry."""
    chosen: dict[str, dict[str, Any]] = {
        "fullgrad": {},
        "simple_fullgrad": {},
        "ig": {"n_steps": ig_steps, "method": "gausslegendre"},
        "gradcam": {},
    }
    out: dict[str, Callable] = {}
    for name, options in chosen.items():
        spec = get_method(name)
        bound = spec.bind(model, im_size=(3, 64, 64), **options)
        out[spec.title] = (lambda x, y, bound=bound: bound(x, y).abs()) if spec.signed else bound
    return out


def explain_and_score(
    model: nn.Module, data: ShapesData, *, ig_steps: int = 32, seed: int = 0
) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """Maps of every method and baseline for ``data`` (target: the true class), and a table with one
    row per method: mean ``pointing``, ``energy``, ``attention_iou``, ``n``, and ``kind``
    (``"method"`` or ``"baseline"``)."""
    maps = {
        name: explain(data.images, data.labels).detach()
        for name, explain in shapes_explainers(model, ig_steps).items()
    }
    maps["random map"] = random_maps(maps["FullGrad"], seed=seed)
    maps["Sobel edges"] = sobel_edges(data.images)
    rows = []
    for name, batch in maps.items():
        scores = localization_scores(batch, data.masks)
        rows.append(
            {
                "method": name,
                "kind": "baseline" if name in BASELINES else "method",
                **{key: float(torch.nanmean(value)) for key, value in scores.items()},
                "n": len(data),
            }
        )
    return maps, pd.DataFrame(rows)


def beats_baselines(table: pd.DataFrame) -> pd.DataFrame:
    """Per checked method: does it beat every baseline on the pointing game and on energy? Columns
    ``method``, ``pointing_margin``, ``energy_margin`` (method minus the best baseline), ``passed``."""
    indexed = table.set_index("method")
    best = indexed.loc[list(BASELINES), ["pointing", "energy"]].max()
    rows = []
    for method in CHECKED:
        margin = indexed.loc[method, ["pointing", "energy"]] - best
        rows.append(
            {
                "method": method,
                "pointing_margin": float(margin["pointing"]),
                "energy_margin": float(margin["energy"]),
                "passed": bool((margin > 0).all()),
            }
        )
    return pd.DataFrame(rows)


def run_shapes(
    out: Path, writer: RunWriter, settings: ShapesSettings | None = None, *, progress: bool = True
) -> ShapesResult:
    """Generate, train, explain, score, check; write everything into ``writer``'s store and ``out``."""
    s = settings or ShapesSettings()
    stage(f"shapes: generating {s.n_train} + {s.n_test} images of 64x64 ...", enabled=progress)
    train = make_shapes_data(s.n_train, seed=s.seed)
    test = make_shapes_data(s.n_test, seed=s.seed + 10_000)  # disjoint stream, fixed by the seed
    bar = progress_bar(s.epochs, "shapes: training ShapesCNN", unit="epochs", enabled=progress)
    losses: list[float] = []

    def on_epoch(_epoch: int, loss: float) -> None:
        losses.append(loss)
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")

    model = train_shapes_cnn(train, epochs=s.epochs, seed=s.seed, on_epoch=on_epoch)
    accuracy = shapes_accuracy(model, test)
    bar.set_postfix(loss=f"{losses[-1]:.3f}", test_acc=f"{accuracy:.3f}")
    bar.close()
    stage(f"shapes: explaining and scoring {min(s.n_eval, s.n_test)} test images ...", enabled=progress)
    scored = test[: s.n_eval]
    maps, table = explain_and_score(model, scored, ig_steps=s.ig_steps, seed=s.seed)
    check = beats_baselines(table)
    passed = bool(check["passed"].all())
    if not passed:
        failing = ", ".join(check.loc[~check["passed"], "method"])
        warnings.warn(
            f"shapes demo: {failing} did not beat the random and edge baselines on the pointing game and "
            "energy in mask",
            RuntimeWarning,
            stacklevel=2,
        )
    result = ShapesResult(accuracy, table, passed)
    folder = out / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    caption = (
        f"{len(scored)} generated test images (ShapesCNN test accuracy {accuracy:.3f} on {s.n_test}): "
        "pointing game = share of maps whose maximum is on the object; energy = share of the map's mass "
        "on the object; Attention-IoU with the object mask. Baselines: a uniform random map and the "
        "Sobel edge magnitude of the image. IG is |sum over colours| with a black baseline."
    )
    store_table(writer, "shapes localization", table, section="metrics", caption=caption)
    store_table(
        writer,
        "shapes check",
        check,
        section="metrics",
        caption="FullGrad, IG and Grad-CAM vs the best baseline (margins > 0 pass)",
    )
    table.to_csv(folder / "localization.csv", index=False)
    check.to_csv(folder / "check.csv", index=False)
    result.files += [folder / "localization.csv", folder / "check.csv"]
    result.files += _figures(model, scored, maps, s, writer, folder)
    result.files += _save_model(model, out)
    result.files += _save_samples(test, out / "samples", count=s.n_show)
    return result


def _figures(
    model: nn.Module,
    data: ShapesData,
    maps: dict[str, torch.Tensor],
    s: ShapesSettings,
    writer: RunWriter,
    folder: Path,
) -> list[Path]:
    k = min(s.n_show, len(data))
    with torch.no_grad():
        predicted = model(data.images[:k]).argmax(dim=1)
    titles = [
        f"{CLASSES[int(y)]}, pred {CLASSES[int(p)]}" for y, p in zip(data.labels[:k], predicted, strict=True)
    ]
    shown = {"object mask": data.masks[:k, None].float(), **{name: m[:k] for name, m in maps.items()}}
    png = figure_png(comparison_grid(data.images[:k], shown, titles=titles), dpi=100)
    store_image(
        writer,
        "shapes saliency grid",
        png,
        section="saliency",
        caption="generated 64x64 test images: the object mask, four methods and two baselines",
    )
    path = folder / "saliency_grid.png"
    path.write_bytes(png)
    return [path]


def _save_model(model: nn.Module, out: Path) -> list[Path]:
    """TorchScript (``bbdecoder explain --model`` loads it without --trust-pickle) and a state_dict
    (for the hook-based methods, with ``--model-class bbdecoder.demo.shapes:ShapesCNN``)."""
    from bbdecoder.demo.run import save_torchscript

    save_torchscript(model, out / MODEL_FILE)
    torch.save(model.state_dict(), out / STATE_DICT_FILE)
    return [out / MODEL_FILE, out / STATE_DICT_FILE]


def _save_samples(data: ShapesData, folder: Path, count: int) -> list[Path]:
    """``shape_<i>.png`` (64x64 RGB) for the first test images; their classes in ``shapes.csv``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for index in range(min(count, len(data))):
        pixels = (data.images[index].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = folder / f"shape_{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
        rows.append(
            {"file": path.name, "label": int(data.labels[index]), "class": CLASSES[int(data.labels[index])]}
        )
    pd.DataFrame(rows).to_csv(folder / "shapes.csv", index=False)
    return [*paths, folder / "shapes.csv"]


__all__ = [
    "ShapesResult",
    "ShapesSettings",
    "beats_baselines",
    "explain_and_score",
    "run_shapes",
    "shapes_explainers",
]
