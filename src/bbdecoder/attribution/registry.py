"""The method registry: every attribution method, its name, family, sign, options and frameworks.

The CLI (``bbdecoder explain --method``, ``bbdecoder methods``), the demo, the documentation's method
table (``docs/methods.md``) and the contract test (``tests/test_method_contract.py``) read it, so a new
method is its file, one :class:`MethodSpec` in the registry's list below (its Keras class, once
ported, in :data:`KERAS_CLASSES`), and its test::

    from bbdecoder import get_method, list_methods

    [spec.name for spec in list_methods()]            # ['gradient', 'inputxgradient', 'ig', ...]
    spec = get_method("gradcam++")                     # a MethodSpec (aliases work too)
    explain = spec.bind(model, layer="layer4")         # options by name: spec.bind(model, n_steps=32)
    maps = explain(x, target)                          # (N, 1, H, W) at input resolution

A bound method's map is ``saliency(x, target)`` for unsigned methods (non-negative) and, for signed
ones, ``attribute(x, target)`` summed over the channels (a signed ``(N, 1, H, W)`` map, shown red/blue).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from bbdecoder.targets import TargetLike

Family = Literal["gradient", "cam", "perturbation", "fullgrad", "rollout"]
FAMILIES: tuple[str, ...] = ("gradient", "fullgrad", "cam", "perturbation", "rollout")
LayerUse = Literal["none", "optional", "required"]
Stage = Literal["init", "call"]

MAX_COUNT = 10_000
"""The largest value of a count option given on the command line (steps, samples, masks, ...)."""


@dataclass(frozen=True)
class Option:
    """One option of a method.

    Attributes:
        name: the keyword argument (``n_steps``).
        type: ``int``, ``float``, ``str`` or ``bool``.
        default: the method's default (the contract test checks it against the signature).
        help: one line for ``--help``, ``bbdecoder methods`` and the docs.
        stage: ``"init"`` (a constructor argument) or ``"call"`` (an argument of ``attribute`` /
            ``saliency``).
        flag: the command-line flag (``--steps``), or ``None`` where the CLI does not expose it. A flag
            shared by several methods has the same type and bounds in each.
        choices: the allowed values of a ``str`` option.
        minimum, maximum: bounds of a number given on the command line.
        from_flag: turns the flag's value into the option's, given the ``(C, H, W)`` of one input
            (``--patch 16`` -> a feature mask of 16 x 16 patches); ``None``: the value as it is.
        flag_help: the flag's help where it differs from ``help``.
    """

    name: str
    type: type
    default: Any
    help: str
    stage: Stage = "init"
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    from_flag: Callable[[Any, tuple[int, ...]], Any] | None = field(default=None, compare=False)
    flag_help: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the CLI name (``bbdecoder explain --method NAME``), lower case.
        title: the display name (figure titles, the demo's tables): ``"Grad-CAM++"``.
        family: ``"gradient"``, ``"fullgrad"``, ``"cam"``, ``"perturbation"`` or ``"rollout"``.
        signed: whether the attribution is signed (the map is ``attribute`` summed over channels) or
            non-negative (the map is ``saliency``).
        summary: one line saying what the map is.
        options: the method's tunable :class:`Option` s (beyond ``input_transform``, ``eval_mode`` and
            the target, which every method takes).
        frameworks: framework -> ``"module:attribute"`` of the class there (imported lazily):
            ``"torch"`` for PyTorch, ``"keras"`` for the Keras port.
        layer: ``"none"`` (the method does not use a layer), ``"optional"`` (the map is made at a layer,
            chosen by default) or ``"required"``.
        aliases: other accepted names (``"integrated_gradients"`` for ``"ig"``).
        needs_hooks: the method registers forward hooks on the model's modules (TorchScript models
            cannot run it).
        batch_invariant: a sample's map does not depend on the other samples of its batch (the
            contract test checks a batch against its samples one by one). Every registered method is:
            the random ones (SmoothGrad, SmoothFullGrad, GradientSHAP, RISE, KernelSHAP) give every
            sample the same draws for the same seed. ``False`` only for a method whose draws or
            passes depend on the batch.
        factory: builds the explainer from ``(model, **kwargs)`` where the class alone does not
            (SmoothGrad wraps a :class:`~bbdecoder.Gradient`); ``None``: the class itself.
    """

    name: str
    title: str
    family: Family
    signed: bool
    summary: str
    frameworks: Mapping[str, str]
    options: tuple[Option, ...] = ()
    layer: LayerUse = "none"
    aliases: tuple[str, ...] = ()
    needs_hooks: bool = False
    batch_invariant: bool = True
    factory: Callable[..., Any] | None = field(default=None, compare=False)

    @property
    def needs_layer(self) -> bool:
        """Whether a layer must be given (no default is chosen)."""
        return self.layer == "required"

    @property
    def cls(self) -> type:
        """The PyTorch class."""
        return self.load("torch")

    def load(self, framework: str = "torch") -> type:
        """The class implementing this method in ``framework`` (``"torch"``, ``"keras"``)."""
        if framework not in self.frameworks:
            have = ", ".join(sorted(self.frameworks))
            raise ValueError(f"method {self.name!r} is not available for {framework!r} (available: {have})")
        module_name, _, attribute = self.frameworks[framework].partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def option(self, name: str) -> Option:
        """The option called ``name`` (a ``KeyError`` naming the valid ones otherwise)."""
        for option in self.options:
            if option.name == name:
                return option
        valid = ", ".join(o.name for o in self.options) or "none"
        raise KeyError(f"method {self.name!r} has no option {name!r} (its options: {valid})")

    def bind(
        self,
        model: nn.Module,
        *,
        layer: Any = None,
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        im_size: tuple[int, ...] | None = None,
        framework: str = "torch",
        **options: Any,
    ) -> BoundMethod:
        """The explainer built on ``model`` with ``options``, as a map function ``f(x, target)``.

        Args:
            model: the PyTorch model.
            layer: the map's layer for ``layer != "none"`` methods (a module, name or glob; ``None``:
                the method's default). Refused by methods that use no layer.
            input_transform: applied inside every forward pass (e.g. :class:`~bbdecoder.Normalize`).
            im_size: ``(C, H, W)`` of one input, for FullGrad's completeness check at construction.
            framework: whose class to build (``"torch"``, or ``"keras"`` with a Keras model).
            options: any of :attr:`options` by name; the others keep their defaults.

        Returns:
            A :class:`BoundMethod`: ``bound(x, target) -> (N, 1, *spatial)``.
        """
        valid = {o.name: o for o in self.options}
        for name in options:
            if name not in valid:
                close = difflib.get_close_matches(name, list(valid), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"method {self.name!r} has no option {name!r} (its options: "
                    f"{', '.join(valid) or 'none'}){hint}"
                )
        if layer is not None and self.layer == "none":
            raise TypeError(f"method {self.name!r} does not use a layer; drop layer=")
        if layer is None and self.needs_layer:
            raise TypeError(f"method {self.name!r} needs a layer: pass layer=")
        init = {k: v for k, v in options.items() if valid[k].stage == "init"}
        call = {k: v for k, v in options.items() if valid[k].stage == "call"}
        build = (self.factory or self.cls) if framework == "torch" else self.load(framework)
        accepted = inspect.signature(build).parameters
        if layer is not None:
            init["layer"] = layer
        if input_transform is not None:
            init["input_transform"] = input_transform
        if im_size is not None and "im_size" in accepted:
            init["im_size"] = tuple(im_size)
        return BoundMethod(self, build(model, **init), call, framework)


@dataclass
class BoundMethod:
    """A registered method built on a model: ``bound(x, target) -> (N, 1, *spatial)``.

    Attributes:
        spec: the :class:`MethodSpec`.
        explainer: the explainer instance (its full API: ``attribute``, ``saliency``, ...).
        call_options: the call-stage options passed to every call.
        framework: ``"torch"`` or ``"keras"`` (where the channel dimension of a signed map is).
    """

    spec: MethodSpec
    explainer: Any
    call_options: dict[str, Any]
    framework: str = "torch"

    def __call__(self, inputs: Any, target: TargetLike = None) -> Any:
        """The map ``(N, 1, *spatial)`` (Keras: ``(N, *spatial, 1)``): ``saliency`` (non-negative), or
        for signed methods ``attribute`` summed over the channel dimension."""
        if not self.spec.signed:
            return self.explainer.saliency(inputs, target, **self.call_options)
        result = self.explainer.attribute(inputs, target, **self.call_options)
        if self.framework == "torch":
            return result.sum(dim=1, keepdim=True)
        import tensorflow as tf  # the Keras port's channels-last maps

        return tf.reduce_sum(result, axis=-1, keepdims=True)


def _smoothgrad(model: nn.Module, *, input_transform: Any = None, **options: Any) -> Any:
    from bbdecoder.attribution.gradient import Gradient
    from bbdecoder.attribution.smoothgrad import SmoothGrad

    return SmoothGrad(Gradient(model, input_transform=input_transform), **options)


def _torch(path: str) -> dict[str, str]:
    return {"torch": f"bbdecoder.attribution.{path}"}


_STEPS = Option("n_steps", int, 50, "path steps", stage="call", flag="--steps", minimum=1, maximum=MAX_COUNT)
_NOISE = Option("noise_level", float, 0.15, "noise sigma as a fraction of each sample's value range")
_CHUNK = Option("internal_batch_size", int, None, "rows per forward pass (default: a memory budget)")
_SEED = Option("seed", int, 0, "seed of the random draws (the same seed gives the same map)")
_ROWS = Option(
    "batch_size",
    int,
    32,
    "perturbed inputs per forward pass",
    flag="--batch-size",
    minimum=1,
    maximum=MAX_COUNT,
)
_PERTURBATION_ROWS = Option(
    "batch_size",
    int,
    None,
    "perturbed inputs per forward pass (default: a memory budget)",
    flag="--batch-size",
    minimum=1,
    maximum=MAX_COUNT,
)
_BASELINE = Option(
    "baselines", float, 0.0, "the value that replaces removed input (pixel space)", stage="call"
)


def patch_mask(patch: int, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """A feature mask ``(1, 1, H, W)`` of ``patch x patch`` squares (the last ones cut at the border),
    numbered row by row: the features of ``--patch`` on the command line."""
    h, w = sample_shape[-2:]
    rows = torch.arange(h).div(patch, rounding_mode="floor").view(-1, 1)
    cols = torch.arange(w).div(patch, rounding_mode="floor").view(1, -1)
    return (rows * -(-w // patch) + cols).view(1, 1, h, w)


_FEATURE_MASK = Option(
    "feature_mask",
    torch.Tensor,
    None,
    "integer feature ids (N or 1, C or 1, H, W), e.g. superpixels (default: every element)",
    stage="call",
    flag_help="features are P x P pixel squares (default: every element)",
    flag="--patch",
    minimum=1,
    maximum=MAX_COUNT,
    from_flag=patch_mask,
)


def _samples(default: int | None, what: str, stage: Stage = "init") -> Option:
    return Option(
        "n_samples", int, default, what, stage=stage, flag="--samples", minimum=1, maximum=MAX_COUNT
    )


def _cam(
    name: str, title: str, path: str, summary: str, *options: Option, aliases: tuple[str, ...] = ()
) -> MethodSpec:
    return MethodSpec(
        name,
        title,
        "cam",
        False,
        summary,
        _torch(path),
        options=tuple(options),
        layer="optional",
        aliases=aliases,
        needs_hooks=True,
    )


KERAS_CLASSES: dict[str, str] = {
    "gradient": "bbdecoder.keras:Gradient",
    "inputxgradient": "bbdecoder.keras:InputXGradient",
    "ig": "bbdecoder.keras:IntegratedGradients",
    "smoothgrad": "bbdecoder.keras:SmoothGrad",
    "gradient_shap": "bbdecoder.keras:GradientSHAP",
    "occlusion": "bbdecoder.keras:Occlusion",
    "feature_ablation": "bbdecoder.keras:FeatureAblation",
    "rise": "bbdecoder.keras:RISE",
    "kernel_shap": "bbdecoder.keras:KernelSHAP",
    "fullgrad": "bbdecoder.keras:FullGrad",
    "simple_fullgrad": "bbdecoder.keras:SimpleFullGrad",
    "smooth_fullgrad": "bbdecoder.keras:SmoothFullGrad",
    "gradcam": "bbdecoder.keras:GradCAM",
    "gradcam++": "bbdecoder.keras:GradCAMPlusPlus",
    "hirescam": "bbdecoder.keras:HiResCAM",
    "xgradcam": "bbdecoder.keras:XGradCAM",
    "layercam": "bbdecoder.keras:LayerCAM",
    "eigencam": "bbdecoder.keras:EigenCAM",
    "scorecam": "bbdecoder.keras:ScoreCAM",
    "ablationcam": "bbdecoder.keras:AblationCAM",
}
"""Method name -> ``"module:Class"`` of its Keras port (``bbdecoder.keras``); add a method here when
the port gains it, and the CLI listing, the docs table and the contract test (with a Keras adapter in
``tests/contract_frameworks.py``) pick it up."""

_TORCH_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "gradient",
        "Gradient",
        "gradient",
        True,
        "dScore/dInput, signed",
        _torch("gradient:Gradient"),
    ),
    MethodSpec(
        "inputxgradient",
        "Input x Gradient",
        "gradient",
        True,
        "input times dScore/dInput, signed",
        _torch("gradient:InputXGradient"),
        aliases=("input_x_gradient",),
    ),
    MethodSpec(
        "ig",
        "Integrated Gradients",
        "gradient",
        True,
        "(x - baseline) times the mean gradient on the straight path; sums to F(x) - F(baseline)",
        _torch("integrated_gradients:IntegratedGradients"),
        options=(
            _STEPS,
            Option(
                "method",
                str,
                "riemann_trapezoid",
                "quadrature rule",
                stage="call",
                choices=(
                    "riemann_left",
                    "riemann_right",
                    "riemann_middle",
                    "riemann_trapezoid",
                    "gausslegendre",
                ),
            ),
            Option(
                "baseline",
                str,
                "black",
                "path start (pixel space)",
                stage="call",
                choices=("black", "white", "uniform", "blur"),
            ),
            replace(_CHUNK, stage="call"),
        ),
        aliases=("integrated_gradients",),
    ),
    MethodSpec(
        "smoothgrad",
        "SmoothGrad",
        "gradient",
        False,
        "|gradient| averaged over noisy copies of the input",
        _torch("smoothgrad:SmoothGrad"),
        options=(
            _samples(25, "noisy copies per input"),
            _NOISE,
            Option(
                "kind",
                str,
                "smoothgrad",
                "mean, mean of squares, or variance",
                choices=("smoothgrad", "smoothgrad_sq", "vargrad"),
            ),
            _SEED,
            _CHUNK,
        ),
        factory=_smoothgrad,
    ),
    MethodSpec(
        "gradient_shap",
        "GradientSHAP",
        "gradient",
        True,
        "expected gradients: IG from random baselines at random path points (Captum's GradientShap)",
        _torch("gradient_shap:GradientSHAP"),
        options=(
            _samples(5, "random (baseline, path point) draws per input", stage="call"),
            Option("stdevs", float, 0.0, "Gaussian noise added to each draw's input", stage="call"),
            _SEED,
            replace(_CHUNK, stage="call"),
        ),
        aliases=("gradientshap",),
    ),
    MethodSpec(
        "fullgrad",
        "FullGrad",
        "fullgrad",
        False,
        "input-gradient plus every bias-gradient map (complete: sums to the score)",
        _torch("fullgrad:FullGrad"),
        options=(Option("check", bool, True, "check completeness on construction"),),
        needs_hooks=True,
    ),
    MethodSpec(
        "simple_fullgrad",
        "SimpleFullGrad",
        "fullgrad",
        False,
        "FullGrad's aggregation with |dScore/dOutput| at every bias layer (any net)",
        _torch("fullgrad:SimpleFullGrad"),
        needs_hooks=True,
    ),
    MethodSpec(
        "smooth_fullgrad",
        "SmoothFullGrad",
        "fullgrad",
        False,
        "FullGrad's map averaged over noisy copies of the input",
        _torch("smooth_fullgrad:SmoothFullGrad"),
        options=(_samples(25, "noisy copies per input"), _NOISE, _SEED, _CHUNK),
        needs_hooks=True,
    ),
    _cam("gradcam", "Grad-CAM", "gradcam:GradCAM", "ReLU of the layer's channels weighted by mean gradients"),
    _cam(
        "gradcam++",
        "Grad-CAM++",
        "cam.gradcam_plusplus:GradCAMPlusPlus",
        "Grad-CAM with second-order positive-gradient weights",
        aliases=("gradcampp", "gradcam_plusplus"),
    ),
    _cam("hirescam", "HiResCAM", "cam.hirescam:HiResCAM", "ReLU of the element-wise gradient x activation"),
    _cam("xgradcam", "XGradCAM", "cam.xgradcam:XGradCAM", "Grad-CAM with activation-normalised weights"),
    _cam("layercam", "LayerCAM", "cam.layercam:LayerCAM", "ReLU(gradient) x activation over channels"),
    _cam("eigencam", "EigenCAM", "cam.eigencam:EigenCAM", "first principal component of the activations"),
    _cam(
        "scorecam",
        "Score-CAM",
        "cam.scorecam:ScoreCAM",
        "channel weights from the scores of activation-masked inputs",
        _ROWS,
    ),
    _cam(
        "ablationcam",
        "Ablation-CAM",
        "cam.ablationcam:AblationCAM",
        "channel weights from the score drop when a channel is zeroed",
        _ROWS,
        Option("ablation_value", float, 0.0, "the value an ablated channel is set to"),
    ),
    MethodSpec(
        "occlusion",
        "Occlusion",
        "perturbation",
        True,
        "score drop when a sliding window is set to the baseline (Captum's Occlusion)",
        _torch("occlusion:Occlusion"),
        options=(
            Option(
                "sliding_window_shapes",
                int,
                8,
                "window side in pixels",
                stage="call",
                flag="--window",
                minimum=1,
                maximum=MAX_COUNT,
            ),
            Option(
                "strides",
                int,
                None,
                "window step in pixels (default: the window)",
                stage="call",
                flag="--stride",
                minimum=1,
                maximum=MAX_COUNT,
            ),
            _BASELINE,
            _PERTURBATION_ROWS,
        ),
    ),
    MethodSpec(
        "feature_ablation",
        "Feature Ablation",
        "perturbation",
        True,
        "score drop when each feature (element, or feature_mask group) is set to the baseline",
        _torch("feature_ablation:FeatureAblation"),
        options=(_FEATURE_MASK, _BASELINE, _PERTURBATION_ROWS),
        aliases=("featureablation",),
    ),
    MethodSpec(
        "rise",
        "RISE",
        "perturbation",
        False,
        "mean of random masks weighted by the masked inputs' target probability",
        _torch("rise:RISE"),
        options=(
            Option(
                "n_masks", int, 4000, "random masks per input", flag="--masks", minimum=1, maximum=MAX_COUNT
            ),
            Option("grid_size", int, 7, "cells per side of a mask"),
            Option("p", float, 0.5, "probability that a cell is kept"),
            _SEED,
            _PERTURBATION_ROWS,
        ),
    ),
    MethodSpec(
        "kernel_shap",
        "KernelSHAP",
        "perturbation",
        True,
        "Shapley values of the features by weighted regression (exact by enumeration for few features)",
        _torch("kernel_shap:KernelSHAP"),
        options=(
            _samples(None, "coalitions per input (default 2 M + 2048)", stage="call"),
            _FEATURE_MASK,
            _BASELINE,
            _SEED,
            _PERTURBATION_ROWS,
        ),
        aliases=("kernelshap",),
    ),
    MethodSpec(
        "attention_rollout",
        "Attention Rollout",
        "rollout",
        False,
        "product of the attention matrices (plus identity) over the blocks, class-token row (ViTs)",
        _torch("rollout:AttentionRollout"),
        options=(
            Option("head_fusion", str, "mean", "how heads are fused", choices=("mean", "max", "min")),
            Option("discard_ratio", float, 0.0, "fraction of the lowest attentions dropped per layer"),
        ),
        needs_hooks=True,
    ),
    MethodSpec(
        "gradient_rollout",
        "Gradient Rollout",
        "rollout",
        False,
        "rollout of gradient-weighted attention (Chefer et al. 2021), class-token row (ViTs)",
        _torch("rollout:GradientRollout"),
        needs_hooks=True,
    ),
)


METHODS: tuple[MethodSpec, ...] = tuple(
    replace(spec, frameworks={**spec.frameworks, "keras": KERAS_CLASSES[spec.name]})
    if spec.name in KERAS_CLASSES
    else spec
    for spec in _TORCH_METHODS
)
"""Every registered method, in the order of the CLI, the docs and ``list_methods``."""


def _index() -> dict[str, MethodSpec]:
    names: dict[str, MethodSpec] = {}
    for spec in METHODS:
        for name in (spec.name, *spec.aliases):
            if name in names:
                raise RuntimeError(f"method name {name!r} is registered twice")
            names[name] = spec
    return names


_BY_NAME = _index()


def list_methods(framework: str | None = None, family: str | None = None) -> list[MethodSpec]:
    """Every registered method, in the registry's order (gradient, FullGrad, CAM, perturbation, rollout).

    Args:
        framework: only the methods available for ``"torch"`` / ``"keras"``; ``None``: all.
        family: only one family (``"cam"``, ...); ``None``: all.

    Returns:
        A list of :class:`MethodSpec`.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return [
        spec
        for spec in METHODS
        if (framework is None or framework in spec.frameworks) and (family is None or spec.family == family)
    ]


def method_names(framework: str | None = None) -> tuple[str, ...]:
    """The CLI names of :func:`list_methods` (no aliases)."""
    return tuple(spec.name for spec in list_methods(framework))


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name`` (case-insensitive; aliases accepted).

    Raises:
        KeyError: no such method; the message lists the names and the closest one.
    """
    key = name.lower() if isinstance(name, str) else name
    if key in _BY_NAME:
        return _BY_NAME[key]
    close = difflib.get_close_matches(str(key), list(_BY_NAME), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"no attribution method {name!r} (registered: {', '.join(method_names())}){hint}")


def _cli_shape(option: Option) -> tuple[Any, ...]:
    return (option.type if option.from_flag is None else option.from_flag, option.minimum, option.maximum)


def option_flags(framework: str | None = None) -> dict[str, list[tuple[MethodSpec, Option]]]:
    """Command-line flag -> the (method, option) pairs it sets, in registry order.

    Raises:
        RuntimeError: a flag whose options differ in type or bounds between methods.
    """
    flags: dict[str, list[tuple[MethodSpec, Option]]] = {}
    for spec in list_methods(framework):
        for option in spec.options:
            if option.flag is None:
                continue
            uses = flags.setdefault(option.flag, [])
            if uses:
                first = uses[0][1]
                if _cli_shape(first) != _cli_shape(option):
                    raise RuntimeError(f"flag {option.flag} has different types or bounds in the registry")
            uses.append((spec, option))
    return flags


def markdown_table(framework_columns: tuple[str, ...] = ("torch", "keras")) -> str:
    """The documentation's method table (``docs/methods.md``), generated from the registry."""
    head = ["name", "class", "family", "signed", "layer", *framework_columns, "options", "what the map is"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in METHODS:
        options = ", ".join(
            f"`{o.name}={o.default!r}`" + (f" (`{o.flag}`)" if o.flag else "") for o in spec.options
        )
        cls_name = spec.frameworks["torch"].partition(":")[2]
        cells = [
            f"`{spec.name}`",
            f"`{cls_name}`",
            spec.family,
            "yes" if spec.signed else "no",
            spec.layer,
            *("yes" if framework in spec.frameworks else "-" for framework in framework_columns),
            options or "-",
            spec.summary,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_listing(framework: str | None = None) -> str:
    """``bbdecoder methods``: one block per method, its options with their flags and defaults."""
    out = []
    for spec in list_methods(framework):
        frameworks = ", ".join(sorted(spec.frameworks))
        sign = "signed" if spec.signed else "non-negative"
        layer = {"none": "", "optional": ", at a layer (default chosen)", "required": ", needs a layer"}
        where = layer[spec.layer]
        also = f" (also: {', '.join(spec.aliases)})" if spec.aliases else ""
        out.append(f"{spec.name}{also}: {spec.title}, {spec.family}, {sign}{where}; {frameworks}")
        out.append(f"    {spec.summary}")
        for option in spec.options:
            flag = f" [{option.flag}]" if option.flag else ""
            out.append(f"    {option.name}={option.default!r}{flag}: {option.help}")
    return "\n".join(out)
