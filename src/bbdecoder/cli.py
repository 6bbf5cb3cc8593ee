"""Command line: ``bbdecoder demo | report | explain | methods | layers | export``.

Exit codes (stable, for scripts): 0 success; 2 bad arguments (argparse and malformed values);
3 a named file or folder does not exist; 4 a file exists but cannot be read as what it should be
(model, image, run store), or a model file is a full pickle and ``--trust-pickle`` was not given;
5 the model does not accept the input or the method (bad shape, hooks on TorchScript, FullGrad
completeness); 6 an optional dependency is missing (pyarrow, tensorboard); 7 an output file or
folder cannot be written (no permission, disk full, a file where a folder should be).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import pickle
import re
import sqlite3
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bbdecoder.attribution.registry import MAX_COUNT, get_method, list_methods, method_names, option_flags

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_UNREADABLE, EXIT_INCOMPATIBLE, EXIT_DEPENDENCY = 0, 2, 3, 4, 5, 6
EXIT_UNWRITABLE = 7
EXIT_CODES = (EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_UNREADABLE, EXIT_INCOMPATIBLE, EXIT_DEPENDENCY,
              EXIT_UNWRITABLE)  # fmt: skip
"""Every exit status the CLI returns (argparse's own errors exit with 2)."""
MAX_INPUT_ELEMENTS = 2**25
"""The largest input tensor (values) ``explain`` and ``layers`` build: 128 MiB as float32, e.g.
3 x 3000 x 3000; checked before anything is allocated (IG and SmoothGrad hold 16 copies)."""
MAX_STEPS = MAX_COUNT
"""Upper bound of the count options (``--steps``, ``--samples``, ...; the registry's ``MAX_COUNT``)."""
METHODS = method_names("torch")
"""``--method`` names: the method registry's (``bbdecoder methods`` lists them with their options)."""
CHUNK = 16
"""Rows per forward pass for IG steps, SmoothGrad samples and the perturbation methods' perturbed
inputs, where not given (a fixed chunk needs no memory probe, which TorchScript models could not run)."""
HOOK_METHODS = {spec.name for spec in list_methods("torch") if spec.needs_hooks}


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
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(
            f"{name} must be comma-separated numbers such as 0.485,0.456,0.406, got {text!r}", 2
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise CLIError(f"{name} values must be finite numbers, got {text!r}", 2)
    return values


def check_budget(shape: Sequence[int], flag: str, text: str) -> None:
    """Refuse an input of ``shape`` larger than :data:`MAX_INPUT_ELEMENTS`, before allocating it."""
    count = math.prod(shape)
    if count > MAX_INPUT_ELEMENTS:
        raise CLIError(
            f"{flag} {text} asks for an input of {count:,} values ({count * 4 / 2**20:,.0f} MiB as float32), "
            f"more than the limit of {MAX_INPUT_ELEMENTS:,} ({MAX_INPUT_ELEMENTS * 4 // 2**20} MiB); "
            "pick a smaller size",
            EXIT_USAGE,
        )


def bounded_int(value: int, flag: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise CLIError(f"{flag} must be between {low} and {high}, got {value}", EXIT_USAGE)
    return value


def output_file(path: str, flag: str, image: bool = False) -> Path:
    """``path`` checked as a file to write, before any work: not a folder, no file in the way of its
    folder, and (``image``) a suffix Pillow can write. Its missing folders are created on writing."""
    target = Path(path)
    if target.is_dir():
        raise CLIError(
            f"{flag} {path} is a folder; pass a file name such as {target / 'map.png'}", EXIT_USAGE
        )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {path}: {parent} is a file, not a folder", EXIT_USAGE)
            break
    if image:
        from PIL import Image

        Image.init()
        writable = sorted(e for e, f in Image.registered_extensions().items() if f in Image.SAVE)
        if target.suffix.lower() not in writable:
            raise CLIError(
                f"{flag} {path}: Pillow cannot write {target.suffix or 'a file without a suffix'!r}; use "
                ".png (or .jpg, .tif, ...)",
                EXIT_USAGE,
            )
    return target


def output_folder(path: str, flag: str) -> Path:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CLIError(f"{flag} {path} is a file; pass a folder (it is created if missing)", EXIT_USAGE)
    return target


def write_failed(path: Path | str, err: OSError) -> CLIError:
    return CLIError(f"cannot write {path}: {err.strerror or err}", EXIT_UNWRITABLE)


def existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"no such {what}: {path}", EXIT_MISSING)
    return p


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# -- models and images -------------------------------------------------------------------------
def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def load_torchscript(path: Path) -> Any:
    """``torch.jit.load(path, map_location="cpu")`` without the DeprecationWarning torch 2.13 raises on
    every call ("torch.jit.load is deprecated. Please switch to torch.export"): it deprecates
    TorchScript as a whole, says nothing about the user's file, and a TorchScript file has no other
    loader. Only that warning is silenced; any other warning of the load still shows."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.load` is (deprecated|not supported)", category=DeprecationWarning
        )
        return torch.jit.load(str(path), map_location="cpu")


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


def _refused_pickle(path: str, err: Exception) -> CLIError:
    """The error for a file the weights-only unpickler refused: a pickle naming a Python object (a
    whole model, or a payload) is refused naming ``--trust-pickle``; anything else is unreadable."""
    text = str(err)
    found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, flags=re.IGNORECASE)
    if found is None:
        detail = text.partition("WeightsUnpickler error:")[2].strip() or _first_line(err)
        return CLIError(
            f"cannot read a model from {path}: the safe loader (torch.load(weights_only=True)) cannot "
            f"parse it ({detail.splitlines()[0] if detail else 'unknown reason'}). Expected a TorchScript "
            "file or a state_dict (with --model-class); a whole pickled model from a source you trust "
            "needs --trust-pickle",
            EXIT_UNREADABLE,
        )
    return CLIError(
        f"refused to load {path}: it is a full pickle, not tensors and a state_dict (it names the Python "
        f"object {found.group(1)}), and unpickling it can run any code hidden in the file. If you trust "
        "where the file comes from, pass --trust-pickle; otherwise save the model as TorchScript "
        "(torch.jit.save) or as a state_dict (torch.save(model.state_dict(), path)) loaded with "
        "--model-class",
        EXIT_UNREADABLE,
    )


def _torch_load(file: Path, path: str, trust_pickle: bool) -> Any:
    """``torch.load`` with the safe (weights-only) unpickler unless ``trust_pickle``; a file the safe
    unpickler refuses is never handed to the full one."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        if trust_pickle:
            return torch.load(file, map_location="cpu", weights_only=False)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if str(err).startswith("Weights only load failed"):
                raise _refused_pickle(path, err) from err
            raise


def load_model(
    path: str,
    model_class: str | None = None,
    model_kwargs: str | None = None,
    *,
    trust_pickle: bool = False,
) -> Any:
    """A model from a TorchScript file, a state_dict plus ``model_class`` (``module:Class``, built with
    the JSON ``model_kwargs``), or, only with ``trust_pickle``, a whole pickled model
    (``torch.save(model)``). Returned in eval mode on the CPU.

    Files are read with ``torch.load(weights_only=True)``, which runs no code from the file; a file it
    refuses (a whole pickled model, or a pickle naming other Python objects) raises a
    :class:`CLIError` naming ``--trust-pickle`` instead of falling back to the full unpickler."""
    from torch import nn

    file = existing(path, "model file")
    if file.is_dir():
        raise CLIError(f"{path} is a folder; pass the model file", EXIT_UNREADABLE)
    try:
        model = load_torchscript(file) if is_torchscript(file) else _torch_load(file, path, trust_pickle)
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(
            f"cannot read a model from {path}: {type(err).__name__}: {_first_line(err)}. Expected a "
            "TorchScript file, torch.save(model.state_dict(), path) with --model-class, or "
            "torch.save(model, path) with --trust-pickle",
            EXIT_UNREADABLE,
        ) from err
    if isinstance(model, dict):
        if model_class is None:
            raise CLIError(
                f"{path} holds a state_dict, not a model: pass --model-class package.module:Class (and "
                "--model-kwargs '{...}' if its constructor needs arguments), or save it as TorchScript",
                EXIT_UNREADABLE,
            )
        cls = import_class(model_class)
        try:
            kwargs = json.loads(model_kwargs) if model_kwargs else {}
        except json.JSONDecodeError as err:
            raise CLIError(f"--model-kwargs must be a JSON object, got {model_kwargs!r} ({err})", 2) from err
        if not isinstance(kwargs, dict):
            raise CLIError(
                f"--model-kwargs must be a JSON object such as '{{\"depth\": 18}}', got {model_kwargs!r}", 2
            )
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
    to ``size`` (H, W), divided by ``scale``. Images over Pillow's decompression-bomb limit are
    refused, and so is a native size over :data:`MAX_INPUT_ELEMENTS` when ``size`` is not given."""
    import numpy as np
    import torch
    from PIL import Image

    file = existing(path, "image file")
    if file.is_dir():
        raise CLIError(f"{path} is a folder; pass the image file", EXIT_UNREADABLE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as opened:
                width, height = opened.size
                if size is None:
                    check_budget((channels, height, width), "the image", f"({width} x {height} pixels)")
                picture = opened.convert("L" if channels == 1 else "RGB")
        if size is not None:
            picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.float32) / scale
    except CLIError as err:
        raise CLIError(f"{err}: pass --size H,W to shrink it", err.code) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise CLIError(
            f"refused to read {path}: {err} Shrink it with another tool, or pass a smaller image",
            EXIT_UNREADABLE,
        ) from None
    except Exception as err:  # Pillow's decoders raise OSError, ValueError, SyntaxError, ...
        raise CLIError(f"cannot read an image from {path}: {_first_line(err)}", EXIT_UNREADABLE) from err
    tensor = torch.from_numpy(array)
    tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.unsqueeze(0).contiguous()


def _describe_output(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {', '.join(map(repr, output.keys()))}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} items"
    return f"a {type(output).__name__}"


def _tensor_items(output: Any) -> list[tuple[str | int, Any]]:
    import torch

    if isinstance(output, Mapping):
        return [(k, v) for k, v in output.items() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        return [(i, v) for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
    return []


def choose_output(output: Any, requested: str | None) -> str | int | None:
    """Which part of a model's output is the logits: ``None`` for a plain tensor, else a dict key
    (also of a ``ModelOutput``), an attribute name, or a tuple index. ``requested`` is
    ``--output-key``; by default ``logits`` if present, else the one tensor in the output."""
    import torch

    if isinstance(output, torch.Tensor):
        if requested is not None:
            raise CLIError(
                f"--output-key {requested!r}: the model returns one tensor, not a dict, ModelOutput or "
                "tuple; drop --output-key",
                EXIT_USAGE,
            )
        return None
    what = _describe_output(output)
    if requested is not None:
        if isinstance(output, Mapping):
            found = [k for k in output if k == requested or str(k) == requested]
            if found:
                return found[0]
        elif isinstance(output, (tuple, list)):
            if requested.strip().isdigit() and int(requested) < len(output):
                return int(requested)
        elif requested.isidentifier() and hasattr(output, requested):
            return requested
        raise CLIError(
            f"--output-key {requested!r} is not in the model's output, {what}"
            + (f"; use an index 0..{len(output) - 1}" if isinstance(output, (tuple, list)) else ""),
            EXIT_USAGE,
        )
    if isinstance(output, Mapping) and "logits" in output:
        return "logits"
    if not isinstance(output, (Mapping, tuple, list)) and isinstance(
        getattr(output, "logits", None), torch.Tensor
    ):
        return "logits"
    tensors = _tensor_items(output)
    if len(tensors) == 1:
        return tensors[0][0]
    raise CLIError(
        f"the model returns {what}: pick the logits with --output-key KEY (a key, attribute or index)",
        EXIT_INCOMPATIBLE,
    )


def pick_output(output: Any, key: str | int) -> Any:
    """The part ``key`` of ``output`` (see :func:`choose_output`)."""
    if isinstance(output, (Mapping, tuple, list)):
        return output[key]  # type: ignore[index]
    return getattr(output, str(key))


def select_output(model: Any, key: str | int) -> Any:
    """``model`` wrapped so that it returns ``pick_output(model(x), key)``; the model itself is not
    changed (it becomes the wrapper's only child)."""
    from torch import nn

    class OutputSelector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return pick_output(self.model(*args, **kwargs), key)

    return OutputSelector().train(model.training)


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
    from bbdecoder.store import StoreError

    if args.out is None:
        args.out = "runs/demo-text" if args.text else "runs/demo"
    if args.text:
        return _text_demo(args)
    if args.epochs is not None:
        bounded_int(args.epochs, "--epochs", 1, 1000)
    if args.images is not None:
        bounded_int(args.images, "--images", 1, 100)
    output_folder(args.out, "--out")
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.no_bias:
        settings.bias = False
    if args.no_shapes:
        settings.shapes = False
    try:
        result = run_demo(
            args.out,
            epochs=args.epochs,
            n_images=args.images,
            settings=settings,
            progress=not args.no_progress,
            tensorboard=args.tensorboard,
        )
    except ImportError as err:  # the demo extra or --tensorboard's package missing
        raise CLIError(str(err), EXIT_DEPENDENCY) from err
    except (OSError, StoreError) as err:  # the output folder or its store cannot be written
        raise CLIError(f"cannot write the demo into {args.out}: {err}", EXIT_UNWRITABLE) from err
    print(f"test accuracy {result.accuracy:.3f}")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4g}")
    print(f"wrote {len(result.files)} files to {result.out_dir}/; open {result.report}")
    return EXIT_OK


def _text_demo(args: argparse.Namespace) -> int:
    from bbdecoder.demo.text_run import TextSettings, run_text_demo
    from bbdecoder.store import StoreError

    for flag, given in (
        ("--no-bias", args.no_bias),
        ("--no-shapes", args.no_shapes),
        ("--tensorboard", args.tensorboard),
    ):
        if given:
            raise CLIError(f"{flag} applies to the image demo, not to demo --text; leave it out", EXIT_USAGE)
    settings = TextSettings.quick() if args.quick else TextSettings()
    if args.epochs is not None:
        settings.epochs = bounded_int(args.epochs, "--epochs", 1, 1000)
    if args.images is not None:
        settings.n_show = bounded_int(args.images, "--images", 1, 100)
    output_folder(args.out, "--out")
    try:
        result = run_text_demo(args.out, settings=settings, progress=not args.no_progress)
    except (OSError, StoreError) as err:
        raise CLIError(f"cannot write the demo into {args.out}: {err}", EXIT_UNWRITABLE) from err
    print(f"test accuracy {result.accuracy:.3f}")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4g}")
    print(f"wrote {len(result.files)} files to {result.out_dir}/; open {result.report}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from bbdecoder.report import build_report
    from bbdecoder.report.builder import REPORT_FILENAME
    from bbdecoder.store import StoreError
    from bbdecoder.store.writer import db_path

    run = existing(args.run_dir, "run folder")
    if not db_path(run).exists():
        raise CLIError(
            f"{args.run_dir} holds no run store ({db_path(run).name}); pass a run folder", EXIT_MISSING
        )
    out = output_file(args.out, "--out") if args.out else None
    if out is None and (run / REPORT_FILENAME).is_dir():
        raise CLIError(f"{run / REPORT_FILENAME} is a folder; remove it or pass --out FILE", EXIT_USAGE)
    try:
        path = build_report(run, out)
    except StoreError as err:
        raise CLIError(str(err), EXIT_UNREADABLE) from err
    except OSError as err:  # the report could not be written (the store is read through sqlite3)
        raise write_failed(err.filename or out or run / REPORT_FILENAME, err) from err
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
    if size is not None:
        check_budget(size, "--input-size", args.input_size)
    model = load_model(args.model, args.model_class, args.model_kwargs, trust_pickle=args.trust_pickle)
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


def resolve_layer(model: Any, text: str) -> Any:
    """The module ``--layer`` names: all digits is a leaf ID as ``bbdecoder layers`` lists them (in a
    nested model the module *named* "2" is usually another layer); otherwise a leaf's qualified
    name or glob pattern matching one leaf, or the qualified name of any submodule (a block)."""
    from bbdecoder.layers import LayerIndex

    index = LayerIndex(model)
    text = text.strip()
    if text.isdigit():
        if not 0 <= int(text) < len(index):
            raise CLIError(
                f"--layer {text}: there is no leaf layer with ID {text}; this model's IDs are "
                f"0..{len(index) - 1} (see bbdecoder layers --model ...)",
                EXIT_USAGE,
            )
        return index[int(text)].module
    submodules = dict(model.named_modules())
    if text in submodules and text not in index.names:
        return submodules[text]
    try:
        chosen = index.select(text)
    except (KeyError, IndexError, TypeError) as err:
        raise CLIError(f"--layer {text!r}: {err.args[0] if err.args else err}", EXIT_USAGE) from None
    if len(chosen) != 1:
        names = ", ".join(layer.display_name for layer in chosen[:5])
        raise CLIError(
            f"--layer {text!r} matches {len(chosen)} layers ({names}{', ...' if len(chosen) > 5 else ''}); "
            "name exactly one",
            EXIT_USAGE,
        )
    return chosen[0].module


def normalization(args: argparse.Namespace, channels: int) -> Any:
    """The ``Normalize`` of ``--mean``/``--std`` (1 or ``channels`` finite values; std > 0), or None."""
    from bbdecoder.attribution import Normalize

    if args.mean is None and args.std is None:
        return None
    mean = float_list(args.mean, "--mean") if args.mean else [0.0]
    std = float_list(args.std, "--std") if args.std else [1.0]
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise CLIError(
                f"{flag} needs 1 or {channels} values (one per channel of --channels {channels}), got "
                f"{len(values)}",
                EXIT_USAGE,
            )
    if any(v <= 0 for v in std):
        raise CLIError("--std values must be positive", EXIT_USAGE)
    return Normalize(mean * (channels // len(mean)), std * (channels // len(std)))


def make_explainer(
    method: str,
    model: Any,
    im_size: tuple[int, ...],
    args: argparse.Namespace,
    norm: Any = None,
    layer: Any = None,
) -> Any:
    """``f(x, target) -> (N, 1, H, W)`` for ``method`` (its registry entry; signed methods: the
    attribution summed over channels); ``norm`` is the input transform, ``layer`` the map's module
    (see :func:`resolve_layer`; default: the method's own choice). The option flags given in ``args``
    go to the methods that take them."""
    spec = get_method(method)
    options: dict[str, Any] = {}
    for option in spec.options:
        value = getattr(args, _dest(option.flag), None) if option.flag else None
        if value is not None:
            options[option.name] = value if option.from_flag is None else option.from_flag(value, im_size)
        elif option.name in ("internal_batch_size", "batch_size") and option.default is None:
            options[option.name] = CHUNK  # a fixed chunk: no memory probe (TorchScript cannot run one)
    return spec.bind(model, layer=layer, input_transform=norm, im_size=im_size, **options)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _methods(args: argparse.Namespace) -> int:
    from bbdecoder.attribution.registry import text_listing

    if args.json:
        listing = [
            {
                "name": spec.name,
                "title": spec.title,
                "family": spec.family,
                "signed": spec.signed,
                "layer": spec.layer,
                "frameworks": sorted(spec.frameworks),
                "aliases": list(spec.aliases),
                "summary": spec.summary,
                "options": [
                    {
                        "name": o.name,
                        "type": o.type.__name__,
                        "default": o.default,
                        "flag": o.flag,
                        "help": o.help,
                        "stage": o.stage,
                    }
                    for o in spec.options
                ],
            }
            for spec in list_methods(args.framework)
        ]
        print(json.dumps(listing, indent=2))
    else:
        print(text_listing(args.framework))
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from bbdecoder.attribution import CompletenessError
    from bbdecoder.viz import overlay

    size = int_list(args.size, "--size", length=2) if args.size else None
    if args.channels not in (1, 3):
        raise CLIError(f"--channels must be 1 or 3, got {args.channels}", 2)
    if size is not None:
        check_budget((args.channels, *size), "--size", args.size)
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise CLIError(f"--scale must be a positive number (pixels are divided by it), got {args.scale}", 2)
    for flag, uses in option_flags().items():
        value = getattr(args, _dest(flag))
        first = uses[0][1]
        if value is not None and first.minimum is not None and first.maximum is not None:
            bounded_int(value, flag, int(first.minimum), int(first.maximum))
    spec = get_method(args.method)
    if args.layer is not None and spec.layer == "none":
        takers = ", ".join(s.name for s in list_methods("torch") if s.layer != "none")
        raise CLIError(
            f"--layer is used by the layer methods ({takers}) only, not by --method {args.method}",
            EXIT_USAGE,
        )
    norm = normalization(args, args.channels)
    out = output_file(
        args.out or str(Path(args.image).with_name(f"{Path(args.image).stem}_{args.method}.png")),
        "--out",
        image=True,
    )
    save_map = None
    if args.save_map:  # np.save adds .npy to any other name: check the file it will write
        name = args.save_map if args.save_map.endswith(".npy") else args.save_map + ".npy"
        save_map = output_file(name, "--save-map")
    model = load_model(args.model, args.model_class, args.model_kwargs, trust_pickle=args.trust_pickle)
    x = load_image(args.image, args.channels, size, args.scale)
    scripted = isinstance(model, torch.jit.ScriptModule)
    if scripted and args.method in HOOK_METHODS:
        raise CLIError(
            f"--method {args.method} needs forward hooks, which a TorchScript model does not support; use "
            f"{', '.join(m for m in METHODS if m not in HOOK_METHODS)}, or pass a state_dict with "
            "--model-class",
            EXIT_INCOMPATIBLE,
        )
    norm_input = x if norm is None else norm(x)
    output = _forward_check(
        model, norm_input, "an image", " (set the image's channels with --channels and its size with --size)"
    )
    key = choose_output(output, args.output_key)
    layer = resolve_layer(model, args.layer) if args.layer is not None else None
    logits = output
    if key is not None:
        logits, model = pick_output(output, key), select_output(model, key)
    picked = "" if key is None else f" (--output-key {key!r})"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise CLIError(
            f"the model returns {getattr(logits, 'shape', type(logits).__name__)}{picked}; explain needs "
            "logits of shape (1, classes)" + ("" if key is None else ": pick another with --output-key"),
            EXIT_INCOMPATIBLE,
        )
    try:
        explain = make_explainer(args.method, model, tuple(x.shape[1:]), args, norm, layer)
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
    signed = spec.signed
    picture = overlay(x[0], saliency[0], signed=signed)
    scale = max(1, 256 // max(picture.shape[:2]))
    for path in [out] if save_map is None else [out, save_map]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_failed(path.parent, err) from err
    try:
        Image.fromarray(picture).resize(
            (picture.shape[1] * scale, picture.shape[0] * scale), Image.Resampling.NEAREST
        ).save(out)
    except OSError as err:
        raise write_failed(out, err) from err
    if save_map is not None:
        try:
            np.save(save_map, saliency[0, 0].cpu().numpy())
        except OSError as err:
            raise write_failed(save_map, err) from err
    probability = float(class_probabilities(logits)[0, target])
    print(f"predicted class {predicted}; explained class {target} (probability {probability:.3f})")
    print(f"wrote {out}" + (f" and {save_map}" if save_map is not None else ""))
    return EXIT_OK


def class_probabilities(scores: Any) -> Any:
    """The class probabilities of a model's (N, C) output: as they are when the model already ends in
    a softmax (rows in [0, 1] summing to 1), ``exp`` of a log-softmax, else the softmax of the logits."""
    import torch

    from bbdecoder.attribution.outputs import probability_kind

    kind = probability_kind(scores)
    scores = scores.detach().double()
    if kind == "softmax":
        return scores
    if kind == "log-softmax":
        return scores.exp()
    return torch.softmax(scores, dim=1)


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
    if not wants_sink(args):  # --mlflow / --wandb write to their own stores
        output_folder(
            args.tensorboard or args.csv or args.parquet,
            next(f"--{name}" for name in ("tensorboard", "csv", "parquet") if getattr(args, name)),
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
    except sqlite3.DatabaseError as err:  # a store whose tables are damaged or missing
        raise CLIError(
            f"cannot read the run store in {args.run_dir}: {err} (the store is damaged)", EXIT_UNREADABLE
        ) from err
    except OSError as err:
        raise write_failed(err.filename or (args.tensorboard or args.csv or args.parquet), err) from err
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------
def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="TorchScript file, state_dict file (with --model-class), or torch.save(model) file (with "
        "--trust-pickle)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a full pickle (torch.save(model)): unpickling runs any code the file holds, so pass "
        "it only for files you trust",
    )
    parser.add_argument("--model-class", help="for a state_dict: 'package.module:Class' or 'file.py:Class'")
    parser.add_argument("--model-kwargs", help="for a state_dict: the constructor's arguments as JSON")


def _method_name(text: str) -> str:
    """``--method``: a registered name or alias, any case (an unknown one is left to ``choices``)."""
    try:
        return get_method(text).name
    except KeyError:
        return text


def _option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per registry option that has one; its help names the methods and their defaults."""
    for flag, uses in option_flags("torch").items():
        first = uses[0][1]
        bounds = f"{first.minimum:g}..{first.maximum:g}; " if first.maximum is not None else ""
        groups: dict[str, list[str]] = {}  # the same help and default: one entry naming every method
        for spec, option in uses:
            text = (option.flag_help or option.help) + (
                "" if option.default is None else f" (default {option.default})"
            )
            groups.setdefault(text, []).append(spec.name)
        parts = [f"{', '.join(names)}: {text}" for text, names in groups.items()]
        kind = int if first.from_flag is not None else first.type  # --patch: a size, made a mask
        parser.add_argument(flag, type=kind, default=None, help=bounds + "; ".join(parts))


def build_parser() -> argparse.ArgumentParser:
    from bbdecoder import __version__

    parser = argparse.ArgumentParser(
        prog="bbdecoder",
        description="Explain and monitor PyTorch models.",
        epilog="exit codes: 0 ok, 2 bad arguments, 3 missing file, 4 unreadable file (or a pickle "
        "without --trust-pickle), 5 model/input mismatch, 6 missing optional dependency, 7 cannot write "
        "an output",
    )
    parser.add_argument("--version", action="version", version=f"bbdecoder {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train the digits CNN with the analyzer, explain it, write a report"
    )
    demo.add_argument(
        "--out", default=None, help="output folder (default: runs/demo; with --text runs/demo-text)"
    )
    demo.add_argument(
        "--text",
        action="store_true",
        help="the text demo instead: a small transformer on a planted-keyword task, token attributions",
    )
    demo.add_argument("--epochs", type=int, help="training epochs (default 4; with --text 3)")
    demo.add_argument(
        "--images",
        type=int,
        help="test images in the saliency grid (default 6; with --text sentences shown, 8)",
    )
    demo.add_argument("--quick", action="store_true", help="the reduced setting of the tests (seconds)")
    demo.add_argument("--no-bias", action="store_true", help="skip the planted-bias study")
    demo.add_argument("--no-shapes", action="store_true", help="skip the generated 64x64 shapes part")
    demo.add_argument("--tensorboard", action="store_true", help="also log live to OUT/tensorboard")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo, subparser=demo)

    report = commands.add_parser("report", help="(re)build report.html from a run store alone")
    report.add_argument("run_dir", metavar="RUN_DIR", help="folder holding run.sqlite")
    report.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html)")
    report.add_argument("--open", action="store_true", help="open the report in a web browser")
    report.set_defaults(handler=_report, subparser=report)

    explain = commands.add_parser("explain", help="saliency map of one image, written as an overlay PNG")
    _model_args(explain)
    explain.add_argument("--image", required=True, help="any image Pillow reads")
    explain.add_argument(
        "--method",
        choices=METHODS,
        default="fullgrad",
        type=_method_name,
        help="attribution method (default fullgrad; `bbdecoder methods` lists them with their options)",
    )
    explain.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    explain.add_argument("--out", help="overlay PNG (default IMAGE_STEM_METHOD.png next to the image)")
    explain.add_argument("--save-map", help="also save the raw (H, W) map as .npy")
    explain.add_argument(
        "--output-key",
        help="for a model returning a dict, ModelOutput or tuple: the key, attribute or index of the logits "
        "(default: 'logits' if present, else the only tensor)",
    )
    explain.add_argument("--channels", type=int, default=3, help="1 (grey) or 3 (RGB, default)")
    explain.add_argument("--size", help="resize to H,W first (e.g. 224,224)")
    explain.add_argument(
        "--scale", type=float, default=255.0, help="divide pixel values by this (default 255)"
    )
    explain.add_argument("--mean", help="normalisation mean per channel, e.g. 0.485,0.456,0.406")
    explain.add_argument("--std", help="normalisation std per channel, e.g. 0.229,0.224,0.225")
    explain.add_argument(
        "--layer",
        help="the layer of a CAM method: a leaf ID as `bbdecoder layers` shows it (all digits), else a "
        "module's qualified name (default: the last feature map of the trunk)",
    )
    _option_flags(explain)
    explain.set_defaults(handler=_explain, subparser=explain)

    methods = commands.add_parser("methods", help="list the attribution methods and their options")
    methods.add_argument("--framework", choices=("torch", "keras"), help="only this framework's methods")
    methods.add_argument("--json", action="store_true", help="machine-readable listing")
    methods.set_defaults(handler=_methods, subparser=methods)

    layers = commands.add_parser("layers", help="the layer table: IDs, names, types, parameters, shapes")
    _model_args(layers)
    layers.add_argument("--input-size", help="e.g. 1,3,224,224: run a forward pass to show output shapes")
    layers.set_defaults(handler=_layers, subparser=layers)

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
    export.set_defaults(handler=_export, subparser=export)

    from bbdecoder.serve.cli import add_parser as add_serve_parser

    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse errors exit with 2 through SystemExit)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser: "bbdecoder explain: error: ..."
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.handler(args))
    except CLIError as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"bbdecoder {args.command}: error: {message}", file=sys.stderr)
        return err.code


if __name__ == "__main__":
    sys.exit(main())
