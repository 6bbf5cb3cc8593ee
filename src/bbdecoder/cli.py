"""Command line: ``bbdecoder demo | report | explain | layers | export``.

Exit codes (stable, for scripts): 0 success; 2 bad arguments (argparse and malformed values);
3 a named file or folder does not exist; 4 a file exists but cannot be read as what it should be
(model, image, run store); 5 the model does not accept the input or the method (bad shape, hooks
on TorchScript, FullGrad completeness); 6 an optional dependency is missing (pyarrow, tensorboard).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_UNREADABLE, EXIT_INCOMPATIBLE, EXIT_DEPENDENCY = 0, 2, 3, 4, 5, 6
METHODS = ("fullgrad", "simple_fullgrad", "smooth_fullgrad", "ig", "smoothgrad", "gradcam", "gradient",
           "inputxgradient")  # fmt: skip
CHUNK = 16
"""Rows per forward pass for IG steps and SmoothGrad samples (a fixed chunk needs no memory probe,
which TorchScript models could not run)."""
HOOK_METHODS = {"fullgrad", "simple_fullgrad", "smooth_fullgrad", "gradcam"}


class CLIError(Exception):
    """A failure with a message for the user and the exit code it maps to."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- parsing helpers ---------------------------------------------------------------------------
def int_list(text: str, name: str, length: int | None = None) -> list[int]:
    """``"1,3,224,224"`` -> ``[1, 3, 224, 224]`` (positive integers), with a clear error otherwise."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(
            f"{name} must be comma-separated integers such as 1,3,224,224, got {text!r}", 2
        ) from None
    if not values or any(v < 1 for v in values) or (length is not None and len(values) != length):
        want = f"{length} " if length is not None else ""
        raise CLIError(f"{name} must be {want}positive integers separated by commas, got {text!r}", 2)
    return values


def float_list(text: str, name: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(
            f"{name} must be comma-separated numbers such as 0.485,0.456,0.406, got {text!r}", 2
        ) from None


def existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"no such {what}: {path}", EXIT_MISSING)
    return p


# -- models and images -------------------------------------------------------------------------
def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def import_class(spec: str) -> Any:
    """``"package.module:Class"`` or ``"path/to/file.py:Class"`` -> the class."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise CLIError(
            f"--model-class must look like 'package.module:Class' or 'file.py:Class', got {spec!r}", 2
        )
    try:
        if module_name.endswith(".py"):
            file = existing(module_name, "model source file")
            loader_spec = importlib.util.spec_from_file_location(file.stem, file)
            if loader_spec is None or loader_spec.loader is None:
                raise CLIError(f"cannot import {file}", EXIT_UNREADABLE)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[file.stem] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(f"cannot import {module_name!r} for --model-class: {err}", EXIT_UNREADABLE) from err
    if not hasattr(module, class_name):
        raise CLIError(f"{module_name} has no class {class_name!r} (--model-class {spec})", EXIT_UNREADABLE)
    return getattr(module, class_name)


def load_model(path: str, model_class: str | None = None, model_kwargs: str | None = None) -> Any:
    """A model from a TorchScript file, a whole pickled model (``torch.save(model)``), or a state_dict
    plus ``model_class`` (``module:Class``, built with the JSON ``model_kwargs``). Returned in eval
    mode on the CPU. Pickled files can run code when loaded: load only files you trust."""
    import torch
    from torch import nn

    file = existing(path, "model file")
    if file.is_dir():
        raise CLIError(f"{path} is a folder; pass the model file", EXIT_UNREADABLE)
    try:
        if is_torchscript(file):
            model = torch.jit.load(str(file), map_location="cpu")
        else:
            try:
                model = torch.load(file, map_location="cpu", weights_only=True)
            except Exception:  # a whole pickled model needs the full unpickler
                model = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CLIError(
            f"cannot read a model from {path}: {type(err).__name__}: {err}. Expected a TorchScript file, "
            "torch.save(model, path), or torch.save(model.state_dict(), path) with --model-class",
            EXIT_UNREADABLE,
        ) from err
    if isinstance(model, dict):
        if model_class is None:
            raise CLIError(
                f"{path} holds a state_dict, not a model: pass --model-class package.module:Class (and "
                "--model-kwargs '{...}' if its constructor needs arguments), or save the whole model",
                EXIT_UNREADABLE,
            )
        cls = import_class(model_class)
        try:
            kwargs = json.loads(model_kwargs) if model_kwargs else {}
        except json.JSONDecodeError as err:
            raise CLIError(f"--model-kwargs must be a JSON object, got {model_kwargs!r} ({err})", 2) from err
        try:
            module = cls(**kwargs)
            module.load_state_dict(model)
        except Exception as err:
            raise CLIError(
                f"the state_dict in {path} does not fit {model_class}({model_kwargs or ''}): {err}",
                EXIT_UNREADABLE,
            ) from err
        model = module
    if not isinstance(model, nn.Module):
        raise CLIError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module", EXIT_UNREADABLE)
    return model.eval()


def load_image(path: str, channels: int, size: list[int] | None, scale: float) -> Any:
    """The image as a (1, C, H, W) float tensor: Pillow, converted to L or RGB, resized (bilinear)
    to ``size`` (H, W), divided by ``scale``."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    file = existing(path, "image file")
    try:
        with Image.open(file) as opened:
            picture = opened.convert("L" if channels == 1 else "RGB")
        if size is not None:
            picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.float32) / scale
    except (UnidentifiedImageError, OSError) as err:
        raise CLIError(f"cannot read an image from {path}: {err}", EXIT_UNREADABLE) from err
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.unsqueeze(0).contiguous()


def _forward_check(model: Any, x: Any, what: str, hint: str = "") -> Any:
    import torch

    try:
        with torch.no_grad():
            return model(x)
    except Exception as err:
        raise CLIError(
            f"the model does not accept {what} of shape {tuple(x.shape)}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}{hint}",
            EXIT_INCOMPATIBLE,
        ) from err


# -- commands ----------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from bbdecoder.demo.run import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.no_bias:
        settings.bias = False
    result = run_demo(
        args.out,
        epochs=args.epochs,
        n_images=args.images,
        settings=settings,
        progress=not args.no_progress,
        tensorboard=args.tensorboard,
    )
    print(f"test accuracy {result.accuracy:.3f}")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4g}")
    print(f"wrote {len(result.files)} files to {result.out_dir}/; open {result.report}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from bbdecoder.report import build_report
    from bbdecoder.store import StoreError
    from bbdecoder.store.writer import db_path

    run = existing(args.run_dir, "run folder")
    if not db_path(run).exists():
        raise CLIError(
            f"{args.run_dir} holds no run store ({db_path(run).name}); pass a run folder", EXIT_MISSING
        )
    try:
        path = build_report(run, args.out)
    except StoreError as err:
        raise CLIError(str(err), EXIT_UNREADABLE) from err
    except Exception as err:  # sqlite3.DatabaseError: not a database
        raise CLIError(f"cannot read the run store in {args.run_dir}: {err}", EXIT_UNREADABLE) from err
    print(f"wrote {path}")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return EXIT_OK


def _layers(args: argparse.Namespace) -> int:
    import torch

    from bbdecoder.hooks import HookManager, preserved_state
    from bbdecoder.layers import LayerIndex

    size = int_list(args.input_size, "--input-size") if args.input_size else None
    model = load_model(args.model, args.model_class, args.model_kwargs)
    index = LayerIndex(model)
    shapes: dict[int, str] = {}
    if size is not None:

        def recorder(layer_id: int) -> Callable[..., None]:
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor) and layer_id not in shapes:
                    shapes[layer_id] = str(list(output.shape))

            return hook

        with HookManager() as hooks, preserved_state(model, eval_mode=True):
            for layer in index:
                if not isinstance(layer.module, torch.jit.ScriptModule):
                    hooks.forward_hook(layer.module, recorder(layer.id))
            _forward_check(model, torch.zeros(size), "an input")
    print(f"{'ID':>4}  {'name':<40} {'type':<20} {'params':>10}" + ("  output shape" if size else ""))
    for row in index.table():
        line = f"{row['id']:>4}  {row['name']!s:<40} {row['type']!s:<20} {row['params']:>10,}"
        print(line + (f"  {shapes.get(int(row['id']), '')}" if size else ""))  # type: ignore[call-overload]
    return EXIT_OK


def make_explainer(method: str, model: Any, im_size: tuple[int, ...], args: argparse.Namespace) -> Any:
    """``f(x, target) -> (N, 1, H, W)`` for ``method`` (input transform = the flags' normalisation)."""
    from bbdecoder.attribution import (
        FullGrad,
        GradCAM,
        Gradient,
        InputXGradient,
        IntegratedGradients,
        Normalize,
        SimpleFullGrad,
        SmoothFullGrad,
        SmoothGrad,
    )

    norm = None
    if args.mean is not None or args.std is not None:
        channels = im_size[0]
        mean = float_list(args.mean, "--mean") if args.mean else [0.0] * channels
        std = float_list(args.std, "--std") if args.std else [1.0] * channels
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise CLIError(f"--mean and --std need 1 or {channels} values (one per channel)", 2)
        if any(v <= 0 for v in std):
            raise CLIError("--std values must be positive", 2)
        norm = Normalize(mean * (channels // len(mean)), std * (channels // len(std)))
    if method == "fullgrad":
        return FullGrad(model, im_size=im_size, input_transform=norm).saliency
    if method == "simple_fullgrad":
        return SimpleFullGrad(model, input_transform=norm).saliency
    if method == "smooth_fullgrad":
        return SmoothFullGrad(model, input_transform=norm).saliency
    if method == "gradcam":
        return GradCAM(model, args.layer, input_transform=norm).saliency
    if method == "ig":
        ig = IntegratedGradients(model, input_transform=norm)
        return lambda x, t: ig.attribute(x, t, n_steps=args.steps, internal_batch_size=CHUNK).sum(
            dim=1, keepdim=True
        )
    if method == "smoothgrad":
        inner = Gradient(model, input_transform=norm)
        return SmoothGrad(inner, n_samples=args.samples, internal_batch_size=CHUNK).saliency
    if method == "gradient":
        return lambda x, t: Gradient(model, input_transform=norm).attribute(x, t).sum(dim=1, keepdim=True)
    inputxgradient = InputXGradient(model, input_transform=norm)
    return lambda x, t: inputxgradient.attribute(x, t).sum(dim=1, keepdim=True)


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from bbdecoder.attribution import CompletenessError, Normalize
    from bbdecoder.viz import overlay

    size = int_list(args.size, "--size", length=2) if args.size else None
    if args.channels not in (1, 3):
        raise CLIError(f"--channels must be 1 or 3, got {args.channels}", 2)
    model = load_model(args.model, args.model_class, args.model_kwargs)
    x = load_image(args.image, args.channels, size, args.scale)
    scripted = isinstance(model, torch.jit.ScriptModule)
    if scripted and args.method in HOOK_METHODS:
        raise CLIError(
            f"--method {args.method} needs forward hooks, which a TorchScript model does not support; use "
            "gradient, inputxgradient, ig or smoothgrad, or pass the pickled model (torch.save(model))",
            EXIT_INCOMPATIBLE,
        )
    norm_input = x
    if args.mean is not None or args.std is not None:
        c = x.shape[1]
        mean = float_list(args.mean, "--mean") if args.mean else [0.0]
        std = float_list(args.std, "--std") if args.std else [1.0]
        norm_input = Normalize(mean * (c // len(mean)), std * (c // len(std)))(x)
    logits = _forward_check(
        model, norm_input, "an image", " (set the image's channels with --channels and its size with --size)"
    )
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise CLIError(
            f"the model returns {getattr(logits, 'shape', type(logits).__name__)}; explain needs logits of "
            "shape (1, classes)",
            EXIT_INCOMPATIBLE,
        )
    try:
        explain = make_explainer(args.method, model, tuple(x.shape[1:]), args)
    except CompletenessError as err:
        raise CLIError(f"{err} (use --method simple_fullgrad)", EXIT_INCOMPATIBLE) from err
    predicted = int(logits.argmax(dim=1))
    target = predicted if args.target is None else args.target
    if not 0 <= target < logits.shape[1]:
        raise CLIError(f"--target {target} is out of range: the model has {logits.shape[1]} classes", 2)
    try:
        saliency = explain(x, target).detach()
    except CompletenessError as err:
        raise CLIError(f"{err} (use --method simple_fullgrad)", EXIT_INCOMPATIBLE) from err
    except Exception as err:
        raise CLIError(
            f"{args.method} failed on this model: {type(err).__name__}: {err}", EXIT_INCOMPATIBLE
        ) from err
    signed = args.method in {"ig", "gradient", "inputxgradient"}
    out = (
        Path(args.out)
        if args.out
        else Path(args.image).with_name(f"{Path(args.image).stem}_{args.method}.png")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = overlay(x[0], saliency[0], signed=signed)
    scale = max(1, 256 // max(picture.shape[:2]))
    Image.fromarray(picture).resize(
        (picture.shape[1] * scale, picture.shape[0] * scale), Image.Resampling.NEAREST
    ).save(out)
    if args.save_map:
        np.save(args.save_map, saliency[0, 0].cpu().numpy())
    probability = float(torch.softmax(logits.double(), dim=1)[0, target])
    print(f"predicted class {predicted}; explained class {target} (probability {probability:.3f})")
    print(f"wrote {out}" + (f" and {args.save_map}" if args.save_map else ""))
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from bbdecoder.sinks.cli import export_to_sink, wants_sink
    from bbdecoder.store import StoreError
    from bbdecoder.store.export import export_csv, export_parquet, export_tensorboard
    from bbdecoder.store.writer import db_path

    run = existing(args.run_dir, "run folder")
    if not db_path(run).exists():
        raise CLIError(
            f"{args.run_dir} holds no run store ({db_path(run).name}); pass a run folder", EXIT_MISSING
        )
    try:
        if args.tensorboard:
            export_tensorboard(run, args.tensorboard)
            print(
                f"wrote TensorBoard event files to {args.tensorboard} "
                f"(view: tensorboard --logdir {args.tensorboard})"
            )
        elif args.csv:
            paths = export_csv(run, args.csv)
            print(f"wrote {len(paths)} CSV files to {args.csv}")
        elif wants_sink(args):
            print(export_to_sink(run, args))
        else:
            paths = export_parquet(run, args.parquet)
            print(f"wrote {len(paths)} Parquet files to {args.parquet}")
    except ImportError as err:
        raise CLIError(str(err), EXIT_DEPENDENCY) from err
    except StoreError as err:
        raise CLIError(str(err), EXIT_UNREADABLE) from err
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------
def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="TorchScript file, torch.save(model) file, or a state_dict file"
    )
    parser.add_argument("--model-class", help="for a state_dict: 'package.module:Class' or 'file.py:Class'")
    parser.add_argument("--model-kwargs", help="for a state_dict: the constructor's arguments as JSON")


def build_parser() -> argparse.ArgumentParser:
    from bbdecoder import __version__

    parser = argparse.ArgumentParser(
        prog="bbdecoder",
        description="Explain and monitor PyTorch models.",
        epilog="exit codes: 0 ok, 2 bad arguments, 3 missing file, 4 unreadable file, "
        "5 model/input mismatch, 6 missing optional dependency",
    )
    parser.add_argument("--version", action="version", version=f"bbdecoder {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train the digits CNN with the analyzer, explain it, write a report"
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--epochs", type=int, help="training epochs (default 4)")
    demo.add_argument("--images", type=int, help="test images in the saliency grid (default 6)")
    demo.add_argument("--quick", action="store_true", help="the reduced setting of the tests (seconds)")
    demo.add_argument("--no-bias", action="store_true", help="skip the planted-bias study")
    demo.add_argument("--tensorboard", action="store_true", help="also log live to OUT/tensorboard")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser("report", help="(re)build report.html from a run store alone")
    report.add_argument("run_dir", metavar="RUN_DIR", help="folder holding run.sqlite")
    report.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    report.add_argument("--open", action="store_true", help="open the report in a web browser")
    report.set_defaults(handler=_report)

    explain = commands.add_parser("explain", help="saliency map of one image, written as an overlay PNG")
    _model_args(explain)
    explain.add_argument("--image", required=True, help="any image Pillow reads")
    explain.add_argument("--method", choices=METHODS, default="fullgrad")
    explain.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    explain.add_argument("--out", help="overlay PNG (default IMAGE_STEM_METHOD.png next to the image)")
    explain.add_argument("--save-map", help="also save the raw (H, W) map as .npy")
    explain.add_argument("--channels", type=int, default=3, help="1 (grey) or 3 (RGB, default)")
    explain.add_argument("--size", help="resize to H,W first (e.g. 224,224)")
    explain.add_argument(
        "--scale", type=float, default=255.0, help="divide pixel values by this (default 255)"
    )
    explain.add_argument("--mean", help="normalisation mean per channel, e.g. 0.485,0.456,0.406")
    explain.add_argument("--std", help="normalisation std per channel, e.g. 0.229,0.224,0.225")
    explain.add_argument("--layer", help="Grad-CAM layer (ID or name; default the last 4-D output)")
    explain.add_argument("--steps", type=int, default=50, help="IG steps (default 50)")
    explain.add_argument("--samples", type=int, default=25, help="SmoothGrad samples (default 25)")
    explain.set_defaults(handler=_explain)

    layers = commands.add_parser("layers", help="the layer table: IDs, names, types, parameters, shapes")
    _model_args(layers)
    layers.add_argument("--input-size", help="e.g. 1,3,224,224: run a forward pass to show output shapes")
    layers.set_defaults(handler=_layers)

    export = commands.add_parser(
        "export", help="export a run store to TensorBoard, CSV, Parquet, MLflow or W&B"
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="folder holding run.sqlite")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files here")
    target.add_argument("--csv", metavar="DIR", help="write CSV files here")
    target.add_argument("--parquet", metavar="DIR", help="write Parquet files here (needs pyarrow)")
    from bbdecoder.sinks.cli import add_export_arguments

    add_export_arguments(target)
    export.set_defaults(handler=_export)

    from bbdecoder.serve.cli import add_parser as add_serve_parser

    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse errors exit with 2 through SystemExit)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CLIError as err:
        print(f"bbdecoder {args.command}: error: {err}", file=sys.stderr)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
