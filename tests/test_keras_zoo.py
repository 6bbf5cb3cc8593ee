"""Every shared input-space method gives the same numbers on Keras as on PyTorch: the zoo twins.

The PyTorch explainers are the oracle. Each zoo net (:mod:`tests.zoo`) and its Keras twin with the
same weights (:mod:`tests.zoo_keras`) are explained in float64 with the same arguments, seeds and
targets; the Keras results (channels-last ``tf.Tensor``) must equal the PyTorch ones transposed.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

tf = pytest.importorskip(
    "tensorflow", reason="the Keras port needs TensorFlow: pip install bbdecoder[tensorflow]"
)

import bbdecoder  # noqa: E402
import bbdecoder.keras as bk  # noqa: E402
from bbdecoder.attribution.registry import list_methods  # noqa: E402

from . import zoo, zoo_keras  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}  # the contract; float64 twins agree to ~1e-12 in practice
TIGHT = {"rtol": 1e-8, "atol": 1e-10}

# A patch grid of 4x4 patches (16 features) and one of 6 (2 rows x 3 columns) for Kernel SHAP.
PATCHES = ((torch.arange(16)[:, None] // 4) * 4 + torch.arange(16)[None, :] // 4).view(1, 1, 16, 16)
SIX = ((torch.arange(16)[:, None] // 8) * 3 + torch.arange(16)[None, :] * 3 // 16).view(1, 1, 16, 16)


def _spatial_mask(mask: torch.Tensor) -> np.ndarray:
    return zoo_keras.nhwc(mask)  # (1, 1, H, W) -> (1, H, W, 1)


def _references() -> torch.Tensor:
    return zoo.zoo_input(3, seed=7, float64=True) * 0.5


# name -> (build(framework_module, model), call(explainer, x, target, framework))
Case = tuple[Callable[[Any, Any], Any], Callable[[Any, Any, Any, str], Any]]
CASES: dict[str, Case] = {
    "gradient": (lambda m, model: m.Gradient(model), lambda e, x, t, f: e.attribute(x, t)),
    "inputxgradient": (lambda m, model: m.InputXGradient(model), lambda e, x, t, f: e.attribute(x, t)),
    "ig": (
        lambda m, model: m.IntegratedGradients(model),
        lambda e, x, t, f: e.attribute(
            x,
            t,
            baseline="uniform",
            n_steps=6,
            method="gausslegendre",
            internal_batch_size=5,
            return_convergence_delta=True,
        ),
    ),
    "smoothgrad": (
        lambda m, model: m.SmoothGrad(
            m.InputXGradient(model),
            n_samples=3,
            noise_level=0.1,
            seed=2,
            kind="vargrad",
            internal_batch_size=4,
        ),
        lambda e, x, t, f: e.attribute(x, t),
    ),
    "gradient_shap": (
        lambda m, model: m.GradientSHAP(model, seed=3),
        lambda e, x, t, f: e.attribute(
            x,
            t,
            baselines=_references() if f == "torch" else zoo_keras.nhwc(_references()),
            n_samples=4,
            stdevs=0.05,
            internal_batch_size=5,
        ),
    ),
    "occlusion": (
        lambda m, model: m.Occlusion(model, batch_size=7),
        lambda e, x, t, f: e.attribute(
            x, t, sliding_window_shapes=(3, 6, 6) if f == "torch" else (6, 6, 3), strides=5, baselines=0.5
        ),
    ),
    "feature_ablation": (
        lambda m, model: m.FeatureAblation(model),
        lambda e, x, t, f: e.attribute(
            x, t, feature_mask=PATCHES if f == "torch" else _spatial_mask(PATCHES)
        ),
    ),
    "rise": (
        lambda m, model: m.RISE(model, n_masks=12, grid_size=4, seed=1, batch_size=7),
        lambda e, x, t, f: e.saliency(x, t),
    ),
    "kernel_shap": (
        lambda m, model: m.KernelSHAP(model),
        lambda e, x, t, f: e.attribute(x, t, feature_mask=SIX if f == "torch" else _spatial_mask(SIX)),
    ),
}


def _target(name: str) -> Any:
    if name == "model_output":  # a ModelOutput / dict: a callable target reads the logits on both sides
        return lambda out: out["logits"][:, 2]
    return [0, 3, 1]


def _as_numpy(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_as_numpy(v) for v in value)
    if isinstance(value, torch.Tensor):
        return zoo_keras.nhwc(value) if value.dim() >= 3 else value.detach().numpy()
    assert isinstance(value, tf.Tensor), type(value)
    return value.numpy()


@pytest.fixture(scope="module")
def twins() -> dict[str, tuple[torch.nn.Module, Any, torch.Tensor, np.ndarray]]:
    pairs = {}
    for name, build in zoo.ZOO.items():
        torch_model = build(0, float64=True)
        x = zoo.zoo_input(3, seed=1, float64=True)
        pairs[name] = (torch_model, zoo_keras.twin(name, torch_model, float64=True), x, zoo_keras.nhwc(x))
    return pairs


def test_the_twins_compute_the_same_function(twins: dict[str, Any]) -> None:
    for name, (torch_model, keras_model, x, x_keras) in twins.items():
        with torch.no_grad():
            expected = zoo.logits_of(torch_model(x)).numpy()
        got = keras_model(x_keras, training=False)
        got = got["logits"] if isinstance(got, dict) else got
        np.testing.assert_allclose(got.numpy(), expected, **TIGHT, err_msg=name)


def test_every_ported_method_is_registered_for_keras() -> None:
    specs = {spec.name: spec for spec in list_methods(framework="keras")}
    assert set(CASES) <= set(specs)
    for name in CASES:
        cls = specs[name].load("keras")
        assert issubclass(cls, specs[name].load("torch")), "the Keras class is the shared class on Keras"
        assert getattr(bk, cls.__name__) is cls


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_keras_equals_pytorch_on_the_twins(twins: dict[str, Any], method: str, name: str) -> None:
    torch_model, keras_model, x, x_keras = twins[name]
    build, call = CASES[method]
    target = _target(name)
    expected = _as_numpy(call(build(bbdecoder, torch_model), x, target, "torch"))
    got = call(build(bk, keras_model), x_keras, target, "keras")
    for part in got if isinstance(got, tuple) else (got,):
        assert isinstance(part, tf.Tensor) and part.dtype == tf.float64
    got = _as_numpy(got)
    pairs = zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]
    for value, reference in pairs:
        assert value.shape == reference.shape
        np.testing.assert_allclose(value, reference, **TIGHT, err_msg=f"{method} on {name}")
        assert np.abs(reference).max() > 0, "a comparison of zeros proves nothing"


@pytest.mark.parametrize("method", ["gradient", "ig", "occlusion"])
def test_float32_twins_agree_to_the_contract(method: str) -> None:
    # Even row counts only: TensorFlow 2.21's oneDNN gradient of a 1x1 stride-2 conv (the residual
    # shortcut) corrupts the heap for odd batches of (16, 16, 6) inputs in float32 (pure TF reproduces
    # it; TF_ENABLE_ONEDNN_OPTS=0 avoids it). float64 does not go through oneDNN.
    torch_model = zoo.residual_net(0)
    keras_model = zoo_keras.twin("residual_net", torch_model)
    x = zoo.zoo_input(2, seed=2)
    build, call = CASES[method]
    if method == "ig":
        call = lambda e, x, t, f: e.attribute(x, t, n_steps=6, internal_batch_size=4)  # noqa: E731
    expected = _as_numpy(call(build(bbdecoder, torch_model), x, None, "torch"))
    got = _as_numpy(call(build(bk, keras_model), zoo_keras.nhwc(x), None, "keras"))
    for value, reference in zip(got, expected, strict=True) if isinstance(got, tuple) else [(got, expected)]:
        assert value.dtype == np.float32
        scale = np.abs(reference).max()
        np.testing.assert_allclose(value / scale, reference / scale, **TOL, err_msg=method)
