"""The Keras explainers refuse unknown keywords as the PyTorch ones do, and take ``baselines=``."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip(
    "tensorflow", reason="the Keras port needs TensorFlow: pip install bbdecoder[tensorflow]"
)

import keras  # noqa: E402

import bbdecoder.keras as bk  # noqa: E402

L = keras.layers


@pytest.fixture(scope="module")
def model() -> Any:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((6, 6, 3)), L.Conv2D(4, 3, padding="same", activation="relu"), L.Flatten(), L.Dense(5)]
    )


def images() -> np.ndarray:
    return np.random.default_rng(0).random((2, 6, 6, 3)).astype("float32")


@pytest.mark.parametrize(
    ("make", "method", "wrong", "nearest"),
    [
        (bk.Gradient, "attribute", "targt", "target"),
        (bk.InputXGradient, "saliency", "targt", "target"),
        (bk.IntegratedGradients, "attribute", "n_step", "n_steps"),
        (lambda m: bk.SmoothGrad(bk.IntegratedGradients(m), n_samples=2), "attribute", "n_step", "n_steps"),
        (bk.FullGrad, "saliency", "target_clas", "target_class"),
        (bk.SimpleFullGrad, "saliency", "targt", "target"),
        (bk.GradCAM, "saliency", "targt", "target"),
    ],
)
def test_unknown_keyword_is_refused(model: Any, make: Any, method: str, wrong: str, nearest: str) -> None:
    explainer = make(model)
    with pytest.raises(TypeError, match=rf"'{wrong}'; did you mean '{nearest}'\?"):
        getattr(explainer, method)(images(), **{wrong: 1})


def test_abs_and_forward_args_are_refused(model: Any) -> None:
    with pytest.raises(TypeError, match="'abs'"):
        bk.Gradient(model).attribute(images(), 1, abs=True)
    with pytest.raises(TypeError, match="wrap the model"):
        bk.Gradient(model).attribute(images(), 1, additional_forward_args=(1.0,))


def test_captum_baselines_name(model: Any) -> None:
    ig = bk.IntegratedGradients(model)
    ours = ig.attribute(images(), [1, 3], baseline=0.25, n_steps=8)
    captum_style = ig.attribute(images(), target=[1, 3], baselines=0.25, n_steps=8)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(captum_style))
