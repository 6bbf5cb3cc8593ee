"""The main job on the embedded default: train the digits CNN with the analyzer attached, explain it,
evaluate the explanations, measure bias on the planted-bias set, train a CNN on the generated 64x64
shapes and score its maps against the object masks, and write a report.

Everything the report shows goes into the run store (``run.sqlite``): training statistics through
the Analyzer, saliency grids as PNG blobs, metric and bias tables as JSON blobs, so
``bbdecoder report RUN_DIR`` rebuilds the page from the store alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.attribution import FullGrad, IntegratedGradients
from bbdecoder.attribution.registry import get_method
from bbdecoder.demo.deps import require_demo_dependencies
from bbdecoder.demo.digits import DigitsCNN, DigitsData, evaluate_accuracy, load_digits_data
from bbdecoder.metrics.completeness import CompletenessResult
from bbdecoder.progress import progress_bar, stage
from bbdecoder.report.blobs import figure_png, store_image, store_table
from bbdecoder.store.schema import DB_FILENAME
from bbdecoder.store.writer import RunWriter
from bbdecoder.viz import comparison_grid, overlay

SIGNED_METHODS = tuple(get_method(name).title for name in ("ig", "gradient"))
"""The grid's signed maps (the registry's ``signed``), drawn red/blue."""
FEATURE_LAYER = "conv2"  # whose output the demo records once per epoch


@dataclass
class DemoSettings:
    """Sizes of the demo. :meth:`quick` is the reduced setting used by the tests (seconds)."""

    epochs: int = 4
    n_images: int = 6
    n_eval: int = 64
    perturbation_step: int = 4
    batch_size: int = 64
    bias: bool = True
    bias_train: int = 1000
    bias_test: int = 300
    bias_epochs: int = 8
    shapes: bool = True
    shapes_train: int = 2500
    shapes_test: int = 500
    shapes_epochs: int = 6
    shapes_eval: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            epochs=2,
            n_images=2,
            n_eval=16,
            bias_train=200,
            bias_test=64,
            bias_epochs=2,
            shapes_train=800,
            shapes_test=100,
            shapes_epochs=3,
            shapes_eval=16,
        )


@dataclass
class DemoResult:
    """What the demo wrote: ``files`` (paths), ``accuracy`` on the test split, a ``metrics`` dict, and
    ``report`` (the HTML file, ``None`` when not built)."""

    out_dir: Path
    accuracy: float
    files: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def fresh_store(out: Path) -> None:
    """Remove a previous run store in ``out`` (the demo always starts a new run)."""
    for suffix in ("", "-wal", "-shm"):
        (out / f"{DB_FILENAME}{suffix}").unlink(missing_ok=True)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    epochs: int | None = None,
    n_images: int | None = None,
    seed: int | None = None,
    settings: DemoSettings | None = None,
    progress: bool = True,
    tensorboard: bool = False,
    report: bool = True,
) -> DemoResult:
    """Run the whole demo into ``out_dir`` (an existing run store there is replaced).

    Writes ``run.sqlite``, ``figures/`` (training figures), ``saliency_grid.png`` and ``overlays/``,
    ``metrics/``, ``bias/``, ``shapes/`` (the shapes scores and overlays), the models as TorchScript
    (``digits_cnn.pt``, ``shapes_cnn.pt``) and state_dicts, ``samples/`` (PNG inputs for
    ``bbdecoder explain``), ``summary.json`` and ``report.html`` (``tensorboard/`` with
    ``tensorboard=True``). ``epochs``, ``n_images`` and ``seed`` override ``settings``.

    Progress goes to stderr: bars in a terminal, one plain line per stage otherwise.
    Raises :class:`~bbdecoder.demo.deps.DemoDependencyError` (an ImportError) before any work when
    a package of the ``demo`` extra is missing.
    """
    require_demo_dependencies()
    s = settings or DemoSettings()
    s = DemoSettings(**{**s.__dict__, **_given(epochs=epochs, n_images=n_images, seed=seed)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fresh_store(out)
    started = time.perf_counter()
    data = load_digits_data(seed=s.seed)
    model, accuracy, files = _train_with_analyzer(data, out, s, progress, tensorboard)
    result = DemoResult(out, accuracy, files)
    writer = RunWriter(out)
    try:
        images, labels = data.x_test[: s.n_images], data.y_test[: s.n_images]
        _saliency(model, images, labels, s, out, writer, result)
        metric_table, explain_metrics = _evaluate(model, data, s, writer, out, result)
        bias_metrics = _bias(s, writer, out, result, progress) if s.bias else {}
        shapes_metrics = _shapes(s, writer, out, result, progress) if s.shapes else {}
        result.files += _save_digits(model, data, out)
        result.metrics = {
            "test_accuracy": accuracy,
            **explain_metrics,
            **{f"{slug(row.method)}_deletion_auc": row.deletion_auc for row in metric_table.itertuples()},
            **{f"{slug(row.method)}_insertion_auc": row.insertion_auc for row in metric_table.itertuples()},
            **bias_metrics,
            **shapes_metrics,
            "seconds": time.perf_counter() - started,
        }
        summary = pd.DataFrame({"quantity": list(result.metrics), "value": list(result.metrics.values())})
        store_table(writer, "demo summary", summary, section="summary", caption="demo results")
        writer.set_meta("demo_settings", json.dumps(s.__dict__))
        writer.set_meta("test_accuracy", f"{accuracy:.4f}")
    finally:
        writer.close()
    path = out / "summary.json"
    path.write_text(json.dumps(result.metrics, indent=2))
    result.files.append(path)
    if report:
        from bbdecoder.report import build_report

        result.report = build_report(out, title="bbdecoder demo: digits CNN")
        result.files.append(result.report)
    return result


def slug(name: str) -> str:
    """``"Integrated Gradients"`` -> ``"integrated_gradients"``, ``"Grad-CAM"`` -> ``"gradcam"``."""
    return name.lower().replace(" ", "_").replace("-", "")


def _given(**values: int | None) -> dict[str, int]:
    return {k: v for k, v in values.items() if v is not None}


def _train_with_analyzer(
    data: DigitsData, out: Path, s: DemoSettings, progress: bool, tensorboard: bool
) -> tuple[nn.Module, float, list[Path]]:
    from bbdecoder.monitor import Analyzer
    from bbdecoder.viz.monitor_plots import plot_activation_fractions

    torch.manual_seed(s.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(s.seed)
    figures = out / "figures"
    files: list[Path] = []
    analyzer = Analyzer(
        model,
        out,
        input_size=(1, *data.x_train.shape[1:]),
        activations=nn.ReLU,
        tensorboard=out / "tensorboard" if tensorboard else None,
    )
    with analyzer:
        n_batches = -(-len(data.y_train) // s.batch_size)
        for epoch in range(s.epochs):
            model.train()
            order = torch.randperm(len(data.y_train), generator=generator)
            bar = progress_bar(
                n_batches, f"digits: epoch {epoch + 1}/{s.epochs}", unit="batches", enabled=progress
            )
            for start in range(0, len(order), s.batch_size):
                idx = order[start : start + s.batch_size]
                loss = F.cross_entropy(analyzer.forward_propagation(data.x_train[idx]), data.y_train[idx])
                optimizer.zero_grad()
                analyzer.backward_propagation(loss, collect_grads=True)
                optimizer.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            model.eval()
            with analyzer.paused():
                accuracy = evaluate_accuracy(model, data.x_test, data.y_test)
            bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{accuracy:.3f}")
            bar.close()
            analyzer.get_inter_features(data.x_test[:1], FEATURE_LAYER)
            files += analyzer.save_collected_grads(figures, ep=epoch)
        files += analyzer.visualize_weight_hist(figures, layers=[nn.Conv2d, nn.Linear])
        files.append(plot_activation_fractions(out, figures))
        analyzer.function_graph(data.x_test[:2], save_folder=figures)
        files += [figures / "function_graph.png", figures / "activation_curves.png"]
        evolution = analyzer.compile_feature_evolution(FEATURE_LAYER, fps=2, save_folder=figures)
        files += [path for path in evolution.values() if path is not None]
        analyzer.layer_costs(save_folder=figures)
        files += [figures / "layer_costs.png", analyzer.architecture(path=figures / "architecture.png")]
    model.eval()
    return model, evaluate_accuracy(model, data.x_test, data.y_test), [f for f in files if f.exists()]


def demo_methods(s: DemoSettings) -> dict[str, dict[str, Any]]:
    """The registry names of the saliency grid's methods and their options (the rest: defaults)."""
    return {
        "fullgrad": {},
        "ig": {"n_steps": 64, "method": "gausslegendre"},
        "smoothgrad": {"n_samples": 32, "seed": s.seed},
        "gradcam": {},
        "gradient": {},
    }


def _explainers(model: nn.Module, s: DemoSettings, im_size: tuple[int, ...]) -> dict[str, Callable]:
    """Method title -> ``f(images, labels) -> (N, 1, H, W)`` (signed for IG and the gradient), built from
    the method registry (:func:`demo_methods`)."""
    return {
        get_method(name).title: get_method(name).bind(model, im_size=im_size, **options)
        for name, options in demo_methods(s).items()
    }


def _saliency(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    s: DemoSettings,
    out: Path,
    writer: RunWriter,
    result: DemoResult,
) -> None:
    """The saliency grid (a PNG in the store and in ``out``), the maps as arrays, overlay PNGs."""
    im_size = tuple(images.shape[1:])
    maps = {
        name: explain(images, labels).detach() for name, explain in _explainers(model, s, im_size).items()
    }
    with torch.no_grad():
        predicted = model(images).argmax(dim=1)
    titles = [f"label {int(y)}, pred {int(p)}" for y, p in zip(labels, predicted, strict=True)]
    png = figure_png(comparison_grid(images, maps, titles=titles, signed=SIGNED_METHODS), dpi=110)
    caption = (
        "test images (rows) explained by five methods; IG and the gradient are signed "
        "(red positive, blue negative), the others non-negative"
    )
    store_image(writer, "saliency grid", png, section="saliency", caption=caption)
    (out / "saliency_grid.png").write_bytes(png)
    result.files.append(out / "saliency_grid.png")
    for name, batch in maps.items():
        writer.add_array("saliency", name, batch.cpu().numpy(), meta={"labels": labels.tolist()})
        for index in range(len(images)):
            path = out / "overlays" / f"{slug(name)}_{index}.png"
            path.parent.mkdir(exist_ok=True)
            _save_rgb(overlay(images[index], batch[index], signed=name in SIGNED_METHODS), path)
            result.files.append(path)


def _evaluate(
    model: nn.Module, data: DigitsData, s: DemoSettings, writer: RunWriter, out: Path, result: DemoResult
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Deletion and insertion AUC of every method on ``n_eval`` test images, and completeness of
    FullGrad and IG; returns the AUC table and the completeness numbers."""
    from bbdecoder.metrics import completeness, deletion, insertion
    from bbdecoder.viz.metric_plots import plot_perturbation_curves

    x, y = data.x_test[: s.n_eval], data.y_test[: s.n_eval]
    im_size = tuple(x.shape[1:])
    rows, deletions, insertions = [], {}, {}
    for name, explain in _explainers(model, s, im_size).items():
        maps = explain(x, y).detach()
        if name in SIGNED_METHODS:
            maps = maps.clamp(min=0)  # rank pixels by positive evidence for the class
        deletions[name] = deletion(model, x, maps, y, step=s.perturbation_step)
        insertions[name] = insertion(model, x, maps, y, step=s.perturbation_step)
        rows.append(
            {
                "method": name,
                "deletion_auc": float(deletions[name].auc.mean()),
                "insertion_auc": float(insertions[name].auc.mean()),
                "n": len(x),
            }
        )
    table = pd.DataFrame(rows)
    store_table(
        writer,
        "deletion and insertion",
        table,
        section="metrics",
        caption=f"mean AUC over {len(x)} test images (deletion: lower is better; insertion: higher is "
        "better); signed maps ranked by their positive part",
    )
    full = completeness(FullGrad(model, im_size=im_size), x, y)
    ig = completeness(IntegratedGradients(model), x, y, n_steps=64, method="gausslegendre")
    with torch.no_grad():
        score = model(x).gather(1, y.view(-1, 1)).squeeze(1).double().abs()  # |F(x)|, the explained logit
    checks = pd.DataFrame(
        [
            {"method": "FullGrad", **_summary(full, score)},
            {"method": "Integrated Gradients (64 Gauss-Legendre steps)", **_summary(ig, score)},
        ]
    )
    store_table(
        writer,
        "completeness",
        checks,
        section="metrics",
        caption="completeness error |sum of attributions - expected| / |F(x)|, F(x) the explained logit "
        "(IG's expected side is F(x) - F(baseline)); median and worst test sample",
    )
    folder = out / "metrics"
    for mode, results in (("deletion", deletions), ("insertion", insertions)):
        png = figure_png(plot_perturbation_curves(results), dpi=110)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{mode}_curves.png").write_bytes(png)
        result.files.append(folder / f"{mode}_curves.png")
        store_image(writer, f"{mode} curves", png, section="metrics", caption=f"mean {mode} curve per method")
    table.to_csv(folder / "deletion_insertion.csv", index=False)
    checks.to_csv(folder / "completeness.csv", index=False)
    result.files += [folder / "deletion_insertion.csv", folder / "completeness.csv"]
    assert ig.convergence_delta is not None
    return table, {
        "fullgrad_completeness_max_rel_error": float(full.relative_error.max()),
        "fullgrad_completeness_error_vs_score_median": float(checks["median error / |F(x)|"][0]),
        "ig_completeness_error_vs_score_median": float(checks["median error / |F(x)|"][1]),
        "ig_completeness_error_vs_score_worst": float(checks["worst error / |F(x)|"][1]),
        "ig_convergence_delta_max_abs": float(ig.convergence_delta.abs().max()),
    }


def _summary(result: CompletenessResult, score: torch.Tensor) -> dict[str, float | int]:
    """Completeness error relative to |F(x)| (not to the expected side, which for IG is
    F(x) - F(baseline) and can be near zero for one sample): median, worst and which sample."""
    errors = result.absolute_error.double().cpu() / score.cpu().clamp_min(1e-12)
    worst = int(errors.argmax())
    return {
        "median error / |F(x)|": float(errors.median()),
        "worst error / |F(x)|": float(errors[worst]),
        "worst sample (test index)": worst,
        "n": int(errors.numel()),
    }


def _bias(
    s: DemoSettings, writer: RunWriter, out: Path, result: DemoResult, progress: bool
) -> dict[str, float]:
    """The planted-bias study: Attention-IoU of Grad-CAM with the true and the spurious regions."""
    from bbdecoder.demo.planted_bias import run_planted_bias_study
    from bbdecoder.viz.metric_plots import plot_bias_examples, plot_group_scores

    stage("planted-bias study: training a biased model and a control ...", enabled=progress)
    study = run_planted_bias_study(
        seed=s.seed, n_train=s.bias_train, n_test=s.bias_test, epochs=s.bias_epochs
    )
    rows = []
    for model_name, scores in study.scores.items():
        table = scores.table()
        for record in table.itertuples():
            rows.append(
                {
                    "model": model_name,
                    "region": record.region,
                    "attention_iou_mean": record.mean,
                    "std": record.std,
                    "n": record.n,
                    "n_nan": record.n_nan,
                    "resolution": record.resolution,
                    "accuracy_aligned": study.accuracy[model_name]["aligned"],
                    "accuracy_conflict": study.accuracy[model_name]["conflict"],
                }
            )
    table = pd.DataFrame(rows)
    store_table(
        writer,
        "attention-iou",
        table,
        section="bias",
        caption=f"Grad-CAM vs region masks on {s.bias_test} unbiased test images; uniform-map baseline "
        f"for the spurious patch {study.uniform_baseline:.3f}",
    )
    groups = []
    for model_name, scores in study.scores.items():
        g = scores.groups(study.test.labels, study.test.spurious, n_boot=200, seed=s.seed)
        groups.append(g.assign(model=model_name))
    group_table = pd.concat(groups, ignore_index=True)
    store_table(
        writer,
        "attention-iou by group",
        group_table,
        section="bias",
        caption="target x protected (spurious colour) groups, bootstrap 95% intervals",
    )
    spurious = group_table[group_table["region"] == "spurious"]
    store_image(
        writer,
        "group scores",
        plot_group_scores(spurious, title="spurious-patch Attention-IoU"),
        section="bias",
        caption="spurious-patch score per group: biased model vs control",
    )
    k = min(4, len(study.test))
    examples = plot_bias_examples(
        study.test.images[:k],
        {name: maps[:k] for name, maps in study.maps.items()},
        {"true": study.test.true_masks[:k], "spurious": study.test.spurious_masks[:k]},
    )
    store_image(
        writer,
        "examples",
        examples,
        section="bias",
        caption="inputs with the true shape (cyan) and the spurious patch (yellow); Grad-CAM maps",
    )
    folder = out / "bias"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "attention_iou.csv", index=False)
    group_table.to_csv(folder / "attention_iou_groups.csv", index=False)
    result.files += [folder / "attention_iou.csv", folder / "attention_iou_groups.csv"]
    biased = table[(table.model == "biased") & (table.region == "spurious")]["attention_iou_mean"]
    control = table[(table.model == "control") & (table.region == "spurious")]["attention_iou_mean"]
    return {
        "bias_spurious_iou_biased": float(biased.iloc[0]),
        "bias_spurious_iou_control": float(control.iloc[0]),
    }


def _shapes(
    s: DemoSettings, writer: RunWriter, out: Path, result: DemoResult, progress: bool
) -> dict[str, float]:
    """The generated 64x64 shapes: maps scored against the object masks, checked against baselines."""
    from bbdecoder.demo.shapes_run import ShapesSettings, run_shapes

    settings = ShapesSettings(
        n_train=s.shapes_train,
        n_test=s.shapes_test,
        epochs=s.shapes_epochs,
        n_eval=s.shapes_eval,
        n_show=min(4, s.shapes_eval),
        ig_steps=32 if s.shapes_eval >= 64 else 8,
        seed=s.seed,
    )
    shapes = run_shapes(out, writer, settings, progress=progress)
    result.files += shapes.files
    return shapes.metrics()


def save_torchscript(model: nn.Module, path: Path) -> Path:
    """``torch.jit.save(torch.jit.script(model))``: the format ``bbdecoder explain --model`` loads without
    ``--trust-pickle``. torch marks TorchScript deprecated; its warning is not the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def _save_digits(model: nn.Module, data: DigitsData, out: Path, count: int = 3) -> list[Path]:
    """The digits CNN as TorchScript and state_dict, and a few test digits as 8x8 grey PNGs
    (``digit_<i>.png``, labels in ``digits.csv``)."""
    from PIL import Image

    save_torchscript(model, out / "digits_cnn.pt")
    torch.save(model.state_dict(), out / "digits_cnn_state_dict.pt")
    files = [out / "digits_cnn.pt", out / "digits_cnn_state_dict.pt"]
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(min(count, len(data.y_test))):
        pixels = (data.x_test[index, 0].numpy() * 255).round().astype(np.uint8)
        path = folder / f"digit_{index}.png"
        Image.fromarray(pixels, mode="L").save(path)
        files.append(path)
        rows.append({"file": path.name, "label": int(data.y_test[index])})
    pd.DataFrame(rows).to_csv(folder / "digits.csv", index=False)
    return [*files, folder / "digits.csv"]


def _save_rgb(picture: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(picture).resize(
        (picture.shape[1] * 16, picture.shape[0] * 16), Image.Resampling.NEAREST
    ).save(path)


__all__ = ["DemoResult", "DemoSettings", "run_demo"]
