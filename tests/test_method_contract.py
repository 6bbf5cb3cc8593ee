"""Every registered method x every zoo model x every framework: the contract a method keeps.

- the map has the documented shape ``(N, 1, H, W)``, finite, non-negative for unsigned methods, and
  ``attribute`` / ``layer_map`` have theirs;
- nothing is left on the model: no hook, no replaced module, modes and ``requires_grad`` restored,
  parameter ``.grad`` untouched, ``state_dict`` keys and values unchanged; also when the call fails
  halfway (a target out of range, a callable target that raises on its second call);
- a batch gives the maps of its samples explained one by one (methods marked ``batch_invariant``);
- the same seed gives the same maps (a fresh explainer, the same call);
- the registry's option defaults are the signatures' defaults.

Frameworks come from ``tests/contract_frameworks.py`` (``ADAPTERS``); a method runs on a framework when
its registry ``frameworks`` names it. Options are cut to tiny settings (few steps, samples, masks).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import numpy as np
import pytest

from bbdecoder import get_method, list_methods
from bbdecoder.attribution.registry import FAMILIES, MethodSpec, option_flags

from .contract_frameworks import ADAPTERS

FAST: dict[str, dict[str, Any]] = {
    "ig": {"n_steps": 4},
    "smoothgrad": {"n_samples": 3},
    "smooth_fullgrad": {"n_samples": 2},
    "gradient_shap": {"n_samples": 3},
    "rise": {"n_masks": 24},
    "kernel_shap": {"n_samples": 40},
    "scorecam": {"batch_size": 5},
    "ablationcam": {"batch_size": 5},
}
MASKED = {"kernel_shap", "feature_ablation"}  # one feature per 4 x 4 patch instead of every element
TARGETS = [2, 1]


def applies(spec: MethodSpec, model: str, adapter: Any) -> bool:
    """Rollouts need attention (the ViT); FullGrad needs a piecewise-linear net and the CAMs a
    channel-first feature map (the CNNs); the gradient and perturbation methods take any model."""
    if spec.family == "rollout":
        return model in adapter.vit_models
    if spec.family in ("fullgrad", "cam"):
        return model in adapter.cnn_models
    return True


def cases() -> list[Any]:
    out = []
    for framework, adapter in ADAPTERS.items():
        for spec in list_methods(framework):
            for model in (*adapter.cnn_models, *adapter.vit_models):
                if applies(spec, model, adapter):
                    case_id = f"{framework}-{spec.name}-{model}"
                    out.append(pytest.param(framework, spec.name, model, id=case_id))
    return out


def options_for(spec: MethodSpec, adapter: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"framework": adapter.name, **FAST.get(spec.name, {})}
    if spec.name in MASKED:
        options["feature_mask"] = adapter.patch_mask()
    return options


def assert_close(a: np.ndarray, b: np.ndarray, what: str, rtol: float = 1e-7) -> None:
    scale = max(float(np.abs(b).max()), 1e-300)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=what)


@pytest.mark.parametrize(("framework", "method", "model_name"), cases())
def test_contract(framework: str, method: str, model_name: str) -> None:
    adapter = ADAPTERS[framework]
    spec = get_method(method)
    model = adapter.build(model_name)
    before = adapter.snapshot(model)
    x = adapter.inputs(len(TARGETS))
    bound = spec.bind(model, **options_for(spec, adapter))
    maps = adapter.to_numpy(bound(x, TARGETS))
    adapter.assert_untouched(model, before)

    assert maps.shape == adapter.map_shape(len(TARGETS))
    assert np.isfinite(maps).all()
    if not spec.signed:
        assert (maps >= 0).all(), "an unsigned method's map has negative values"
    assert np.abs(maps).max() > 0, "an all-zero map"

    # A fresh explainer, the same seed: the same draws. (Not bitwise: LAPACK's least squares, used by
    # KernelSHAP, may round differently from run to run with the buffers' alignment.)
    again = adapter.to_numpy(spec.bind(model, **options_for(spec, adapter))(x, TARGETS))
    assert_close(again, maps, "not deterministic with the same seed", rtol=1e-10)

    if spec.batch_invariant:
        singles = np.concatenate(
            [adapter.to_numpy(bound(adapter.rows(x, i, i + 1), [t])) for i, t in enumerate(TARGETS)]
        )
        assert_close(maps, singles, "batch result differs from one-by-one")

    explainer = bound.explainer
    if spec.family == "cam":
        adapter.check_layer_map(adapter.to_numpy(explainer.layer_map(x, TARGETS)).shape, len(TARGETS))
    elif spec.family == "rollout":
        adapter.check_layer_map(adapter.to_numpy(explainer.attribute(x, TARGETS)).shape, len(TARGETS))
    else:
        attribution = explainer.attribute(x, TARGETS, **bound.call_options)
        assert tuple(attribution.shape) == tuple(x.shape)
    adapter.assert_untouched(model, before)


class Bomb:
    """A callable target that scores the first class once, then raises (a failure halfway)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, output: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("bomb")
        scores = output["logits"] if isinstance(output, dict) else output
        return scores[:, 0]


@pytest.mark.parametrize(("framework", "method", "model_name"), cases())
def test_contract_on_errors(framework: str, method: str, model_name: str) -> None:
    adapter = ADAPTERS[framework]
    spec = get_method(method)
    model = adapter.build(model_name)
    before = adapter.snapshot(model)
    bound = spec.bind(model, **options_for(spec, adapter))
    x = adapter.inputs(len(TARGETS))
    with pytest.raises(Exception, match=r"(?i)range|class|target|index"):
        bound(x, [0, adapter.num_classes + 5])
    adapter.assert_untouched(model, before)
    with contextlib.suppress(Exception):  # fails where the method calls the target more than once
        bound(x, Bomb())
    adapter.assert_untouched(model, before)


@pytest.mark.parametrize("spec", list_methods(), ids=lambda spec: spec.name)
def test_registry_defaults_are_the_signatures(spec: MethodSpec) -> None:
    cls = spec.cls
    init = inspect.signature(cls.__init__).parameters
    call = inspect.signature(cls.attribute if spec.signed else cls.saliency).parameters
    for option in spec.options:
        where = init if option.stage == "init" else call
        if option.stage == "call" and option.name not in where:
            where = inspect.signature(cls.attribute).parameters  # saliency forwards to attribute
        assert option.name in where, f"{spec.name}: {option.name} is not a parameter ({option.stage})"
        assert where[option.name].default == option.default, (spec.name, option.name)
        assert option.choices is None or option.default is None or option.default in option.choices
    assert spec.family in FAMILIES
    assert "torch" in spec.frameworks
    assert get_method(spec.name) is spec and all(get_method(a) is spec for a in spec.aliases)
    if spec.layer != "none":
        assert "layer" in init


def test_registry_lookup_errors_and_flags() -> None:
    with pytest.raises(KeyError, match=r"did you mean 'gradcam'"):
        get_method("gradcm")
    with pytest.raises(TypeError, match=r"no option 'n_step'.*did you mean 'n_steps'"):
        get_method("ig").bind(object(), n_step=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="does not use a layer"):
        get_method("gradient").bind(object(), layer="x")  # type: ignore[arg-type]
    assert get_method("GradCAM++") is get_method("gradcampp")
    assert [s.name for s in list_methods(family="cam")][:2] == ["gradcam", "gradcam++"]
    flags = option_flags()
    assert {spec.name for spec, _ in flags["--samples"]} >= {"smoothgrad", "gradient_shap"}
