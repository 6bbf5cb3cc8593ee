"""Keras models that end in a softmax/sigmoid: the logits beneath are explained, or a named refusal.

The oracle is the same model without its head activation (``classifier_activation=None``, or the zoo
twin's logits): explaining the softmax-headed model must give exactly its maps. ``scores_from="output"``
explains the probabilities, as PyTorch's does.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Any

import numpy as np
import pytest
import torch

tf = pytest.importorskip(
    "tensorflow", reason="the Keras port needs TensorFlow: pip install bbdecoder[tensorflow]"
)

import keras  # noqa: E402

import bbdecoder  # noqa: E402
import bbdecoder.keras as bk  # noqa: E402
from bbdecoder.backends.keras_core import probability_head  # noqa: E402

from . import zoo, zoo_keras  # noqa: E402

L = keras.layers
TIGHT = {"rtol": 1e-8, "atol": 1e-10}


@pytest.fixture(scope="module")
def heads() -> dict[str, Any]:
    """The zoo's softmax head and its logits twin, in float64, with the same weights."""
    torch_model = zoo.softmax_head(0, float64=True)
    return {
        "torch": torch_model,
        "logits": zoo_keras.twin("plain_cnn", zoo.plain_cnn(0, float64=True), float64=True),
        "dense_softmax": zoo_keras.twin("softmax_head", torch_model, float64=True),
        "softmax_layer": zoo_keras.twin("softmax_head", torch_model, float64=True, variant="softmax_layer"),
        "x": zoo.zoo_input(2, seed=3, float64=True),
    }


def _images(heads: dict[str, Any]) -> np.ndarray:
    return zoo_keras.nhwc(heads["x"])


@pytest.mark.parametrize("head", ["dense_softmax", "softmax_layer"])
def test_the_logits_beneath_a_softmax_are_explained(heads: dict[str, Any], head: str) -> None:
    model, x = heads[head], _images(heads)
    assert np.allclose(model(x).numpy().sum(axis=1), 1.0)  # the model does return probabilities
    expected = bk.Gradient(heads["logits"]).attribute(x, [1, 2]).numpy()
    np.testing.assert_allclose(bk.Gradient(model).attribute(x, [1, 2]).numpy(), expected, **TIGHT)
    ig, delta = bk.IntegratedGradients(model).attribute(x, None, n_steps=8, return_convergence_delta=True)
    ig_logits, delta_logits = bk.IntegratedGradients(heads["logits"]).attribute(
        x, None, n_steps=8, return_convergence_delta=True
    )
    np.testing.assert_allclose(ig.numpy(), ig_logits.numpy(), **TIGHT)
    np.testing.assert_allclose(delta.numpy(), delta_logits.numpy(), **TIGHT)  # deltas against logits
    # The PyTorch side looks through its nn.Softmax the same way.
    torch_grad = bbdecoder.Gradient(heads["torch"]).attribute(heads["x"], [1, 2])
    np.testing.assert_allclose(expected, zoo_keras.nhwc(torch_grad), **TIGHT)


def test_scores_from_output_explains_the_probabilities(heads: dict[str, Any]) -> None:
    x = _images(heads)
    model = heads["dense_softmax"]
    got = bk.Gradient(model, scores_from="output").attribute(x, [1, 2]).numpy()
    torch_got = bbdecoder.Gradient(heads["torch"], scores_from="output").attribute(heads["x"], [1, 2])
    np.testing.assert_allclose(got, zoo_keras.nhwc(torch_got), **TIGHT)
    point = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(point)
        total = tf.reduce_sum(tf.gather(model(point, training=False), [1, 2], axis=1, batch_dims=1))
    np.testing.assert_allclose(got, tape.gradient(total, point).numpy(), **TIGHT)
    logits_map = bk.Gradient(model).attribute(x, [1, 2]).numpy()
    assert not np.allclose(got, logits_map)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_activation_layers_and_fused_sigmoids_are_looked_through(activation: str) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    logits = L.Dense(3, name="logits")(L.Dense(4, activation="tanh")(inputs))
    separate = keras.Model(inputs, L.Activation(activation)(logits))
    fused_dense = L.Dense(3, activation=activation)
    fused = keras.Model(inputs, fused_dense(separate.layers[1](inputs)))
    fused_dense.set_weights(separate.get_layer("logits").get_weights())
    x = np.random.default_rng(0).normal(size=(4, 5))
    expected = bk.Gradient(keras.Model(inputs, logits)).attribute(x, 2).numpy()
    for model in (separate, fused):
        np.testing.assert_allclose(bk.Gradient(model).attribute(x, 2).numpy(), expected, rtol=1e-5)


def test_a_softmax_inside_call_is_refused_with_the_fix() -> None:
    class Classifier(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.dense = L.Dense(3)

        def call(self, x: Any) -> Any:
            return tf.nn.softmax(self.dense(x))

    model = Classifier()
    x = np.random.default_rng(1).normal(size=(2, 4)).astype("float32")
    model(x)
    assert probability_head(model) is None
    with pytest.raises(bk.ProbabilityOutputError, match=r"softmax.*scores_from='output'") as info:
        bk.IntegratedGradients(model).attribute(x, 0, n_steps=4)
    assert "Dense(..., activation='softmax')" in str(info.value)
    assert bk.Gradient(model, scores_from="output").attribute(x, 0).shape == (2, 4)


def test_the_head_is_restored_also_when_a_call_fails(heads: dict[str, Any]) -> None:
    model, x = heads["dense_softmax"], _images(heads)
    head = model.get_layer("9")
    before = model(x).numpy()

    def failing(output: Any) -> Any:
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        bk.Gradient(model).attribute(x, failing)
    assert head.activation is keras.activations.softmax
    np.testing.assert_array_equal(model(x).numpy(), before)
    assert "call" not in vars(model.layers[-1])


@pytest.fixture(scope="module")
def applications() -> tuple[Any, Any]:
    """keras.applications' MobileNetV3Small (its head: Conv 'logits', Flatten, Activation 'predictions'),
    with the softmax head and without it (``classifier_activation=None``), with the same weights."""
    keras.utils.set_random_seed(0)
    settings = {
        "weights": None,
        "input_shape": (32, 32, 3),
        "classes": 5,
        "minimalistic": True,
        "include_preprocessing": False,
    }
    headed = keras.applications.MobileNetV3Small(**settings)
    plain = keras.applications.MobileNetV3Small(**settings, classifier_activation=None)
    plain.set_weights(headed.get_weights())
    return headed, plain


def test_keras_applications_softmax_head(applications: tuple[Any, Any]) -> None:
    headed, plain = applications
    layer, fused = probability_head(headed)  # type: ignore[misc]
    assert layer.name == "predictions" and not fused
    assert probability_head(plain) is None
    x = np.random.default_rng(2).uniform(size=(2, 32, 32, 3)).astype("float32")
    expected = bk.Gradient(plain).attribute(x, [0, 4]).numpy()
    np.testing.assert_allclose(
        bk.Gradient(headed).attribute(x, [0, 4]).numpy(), expected, rtol=1e-5, atol=1e-7
    )
    smooth = bk.SmoothGrad(headed, n_samples=2, seed=1).attribute(x, [0, 4]).numpy()
    smooth_plain = bk.SmoothGrad(plain, n_samples=2, seed=1).attribute(x, [0, 4]).numpy()
    np.testing.assert_allclose(smooth, smooth_plain, rtol=1e-5, atol=1e-7)


def test_torch_and_keras_refuse_alike() -> None:
    """Both sides name the softmax, the reason and both fixes."""

    class TorchSoftmax(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.fc(x), dim=1)

    with pytest.raises(bbdecoder.ProbabilityOutputError, match=r"softmax.*scores_from='output'"):
        bbdecoder.Gradient(TorchSoftmax()).attribute(torch.randn(2, 4), 0)
