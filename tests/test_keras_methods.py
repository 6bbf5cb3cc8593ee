"""Keras port: targets, Gradient, Integrated Gradients, SmoothGrad, Grad-CAM and the post-processing,
against analytic models, brute-force loops and the PyTorch side's functions."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tf = pytest.importorskip(
    "tensorflow", reason="the Keras port needs TensorFlow: pip install bbdecoder[tensorflow]"
)

import keras  # noqa: E402

import bbdecoder.keras as bk  # noqa: E402
from bbdecoder.attribution.baselines import make_baseline  # noqa: E402
from bbdecoder.attribution.postprocess import channel_sum_minmax as torch_channel_sum_minmax  # noqa: E402
from bbdecoder.attribution.smoothgrad import SmoothGrad as TorchSmoothGrad  # noqa: E402
from bbdecoder.keras.postprocess import channel_sum_minmax, resize_to  # noqa: E402
from bbdecoder.keras.targets import select_scores  # noqa: E402

L = keras.layers


@pytest.fixture(scope="module")
def linear() -> tuple[Any, np.ndarray, np.ndarray]:
    """F(x) = flatten(x) @ W + b: gradient W[:, c], IG from a black baseline x * W[:, c], analytically."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 2)), L.Flatten(), L.Dense(5)])
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(32, 5)).astype("float32"), rng.normal(size=5).astype("float32")
    model.layers[-1].set_weights([weight, bias])
    return model, weight, bias


@pytest.fixture(scope="module")
def cnn() -> Any:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 2))
    h = L.Conv2D(3, 3, padding="same", activation="softplus", name="features")(inputs)
    h = L.AveragePooling2D(2, name="pooled")(h)
    outputs = L.Dense(4)(L.Flatten()(h))
    return keras.Model(inputs, outputs)


def _x(shape: tuple[int, ...], seed: int = 0) -> Any:
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype("float32"))


# -- targets ----------------------------------------------------------------------------------------
def test_every_target_form_selects_the_same_scores(linear: tuple[Any, np.ndarray, np.ndarray]) -> None:
    model = linear[0]
    x = _x((3, 4, 4, 2))
    output = model(x)
    classes = [4, 0, 2]
    expected = output.numpy()[np.arange(3), classes]
    for target in (
        classes,
        np.array(classes),
        tf.constant(classes),
        lambda out: tf.gather(out, classes, batch_dims=1, axis=1),
    ):
        np.testing.assert_allclose(select_scores(output, target, 3).numpy(), expected)
    np.testing.assert_allclose(select_scores(output, None, 3).numpy(), output.numpy().max(axis=1))
    np.testing.assert_allclose(select_scores(output, 1, 3).numpy(), output.numpy()[:, 1])


@pytest.mark.parametrize(
    ("target", "message"),
    [([1, 2], "for a batch of 3"), (7, "out of range"), ([0.5, 1.0, 2.0], "integers"), (True, "bool"),
     (lambda out: out, "shape \\(3,\\)")],
)  # fmt: skip
def test_bad_targets_are_rejected_with_the_fix(
    linear: tuple[Any, np.ndarray, np.ndarray], target: Any, message: str
) -> None:
    with pytest.raises(bk.TargetError, match=message):
        bk.Gradient(linear[0]).attribute(_x((3, 4, 4, 2)), target)


def test_dict_outputs_class_targets_read_logits_others_need_a_callable() -> None:
    inputs = keras.Input((3,))
    dense = L.Dense(2)
    model = keras.Model(inputs, {"logits": dense(inputs)})  # PyTorch's ModelOutput convention
    expected = np.tile(dense.kernel.numpy()[:, 1], (2, 1))
    np.testing.assert_allclose(bk.Gradient(model).attribute(_x((2, 3)), 1).numpy(), expected, rtol=1e-6)
    grad = bk.Gradient(model).attribute(_x((2, 3)), target=lambda out: out["logits"][:, 1])
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6)
    other = keras.Model(inputs, {"scores": dense(inputs)})
    with pytest.raises(bk.TargetError, match="callable"):
        bk.Gradient(other).attribute(_x((2, 3)))


# -- Gradient, InputXGradient, Integrated Gradients ---------------------------------------------------
def test_gradient_and_input_x_gradient_are_analytic(linear: tuple[Any, np.ndarray, np.ndarray]) -> None:
    model, weight, _ = linear
    x = _x((2, 4, 4, 2))
    expected = np.stack([weight[:, 3].reshape(4, 4, 2)] * 2)
    np.testing.assert_allclose(bk.Gradient(model).attribute(x, 3).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(bk.InputXGradient(model)(x, 3).numpy(), x.numpy() * expected, rtol=1e-6)
    saliency = bk.Gradient(model).saliency(x, 3).numpy()
    np.testing.assert_allclose(saliency, np.abs(expected).sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"])
def test_integrated_gradients_is_exact_on_an_affine_model(
    linear: tuple[Any, np.ndarray, np.ndarray], method: str
) -> None:
    model, weight, _ = linear
    x = _x((2, 4, 4, 2), seed=1)
    attribution, delta = bk.IntegratedGradients(model).attribute(
        x, target=[1, 2], baseline=0.5, n_steps=5, method=method, return_convergence_delta=True
    )
    expected = (x.numpy() - 0.5) * np.stack([weight[:, c].reshape(4, 4, 2) for c in (1, 2)])
    np.testing.assert_allclose(attribution.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(tf.reduce_max(tf.abs(delta))) < 1e-4


def test_integrated_gradients_chunking_and_completeness_on_a_smooth_cnn(cnn: Any) -> None:
    x = _x((3, 8, 8, 2), seed=2)
    ig = bk.IntegratedGradients(cnn)
    whole, delta = ig.attribute(x, None, n_steps=32, method="gausslegendre", return_convergence_delta=True)
    chunked = ig.attribute(x, None, n_steps=32, method="gausslegendre", internal_batch_size=5)
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-5, atol=1e-7)
    assert float(tf.reduce_max(tf.abs(delta))) < 1e-3  # sum(IG) = F(x) - F(black) for a smooth model
    # Brute force: the same rule evaluated one node at a time with a plain tape.
    alphas, weights = np.polynomial.legendre.leggauss(32)
    classes = tf.argmax(cnn(x), axis=1)
    total = np.zeros(x.shape, dtype=np.float64)
    for alpha, w in zip(0.5 * (alphas + 1), 0.5 * weights, strict=True):
        point = tf.constant(alpha * x.numpy())
        with tf.GradientTape() as tape:
            tape.watch(point)
            score = tf.reduce_sum(tf.gather(cnn(point), classes, axis=1, batch_dims=1))
        total += w * tape.gradient(score, point).numpy()
    np.testing.assert_allclose(whole.numpy(), x.numpy() * total, rtol=1e-4, atol=1e-6)


def test_named_baselines_are_the_pytorch_baselines_transposed() -> None:
    x = _x((2, 6, 6, 3), seed=3)
    channels_first = torch.from_numpy(np.moveaxis(x.numpy(), -1, 1).copy())
    for spec in ("black", "white", "uniform", "blur"):
        expected = make_baseline(spec, channels_first, seed=0).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(bk.keras_baseline(spec, x).numpy(), expected, rtol=1e-6, err_msg=spec)
    np.testing.assert_array_equal(bk.keras_baseline(np.ones((1, 6, 6, 3)), x).numpy(), np.ones((2, 6, 6, 3)))
    with pytest.raises(ValueError, match="unknown baseline"):
        bk.keras_baseline("grey", x)
    with pytest.raises(ValueError, match="does not broadcast"):
        bk.keras_baseline(np.zeros((3, 6, 6, 3)), x)


# -- SmoothGrad ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smoothgrad_equals_a_loop_over_its_noisy_copies(cnn: Any, kind: str) -> None:
    x = _x((2, 8, 8, 2), seed=4)
    smooth = bk.SmoothGrad(bk.InputXGradient(cnn), n_samples=5, kind=kind, seed=1, internal_batch_size=4)
    classes = tf.argmax(cnn(x), axis=1)
    per_copy = np.stack(
        [bk.InputXGradient(cnn).attribute(copy, classes).numpy() for copy in smooth.noisy_copies(x)]
    )
    expected = {
        "smoothgrad": per_copy.mean(0),
        "smoothgrad_sq": (per_copy**2).mean(0),
        "vargrad": per_copy.var(0),
    }
    np.testing.assert_allclose(smooth.attribute(x).numpy(), expected[kind], rtol=1e-5, atol=1e-7)


def test_smoothgrad_noise_is_pytorchs_noise_transposed(cnn: Any) -> None:
    x = _x((2, 8, 8, 2), seed=5)
    copies = bk.SmoothGrad(cnn, n_samples=3, noise_level=0.2, seed=9).noisy_copies(x)
    torch_copies = TorchSmoothGrad(torch.nn.Identity(), n_samples=3, noise_level=0.2, seed=9).noisy_copies(
        torch.from_numpy(np.moveaxis(x.numpy(), -1, 1).copy())
    )
    for copy, torch_copy in zip(copies, torch_copies, strict=True):
        np.testing.assert_allclose(copy.numpy(), torch_copy.permute(0, 2, 3, 1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        bk.SmoothGrad(cnn, kind="median")


# -- Grad-CAM -----------------------------------------------------------------------------------------
def test_gradcam_matches_a_hand_computed_map(cnn: Any) -> None:
    x = _x((2, 8, 8, 2), seed=6)
    features = keras.Model(cnn.inputs, cnn.get_layer("pooled").output)
    head = cnn.layers[-2:]
    activation = features(x)
    with tf.GradientTape() as tape:
        tape.watch(activation)
        out = activation
        for layer in head:
            out = layer(out)
        score = tf.reduce_sum(out[:, 1])
    weights = tf.reduce_mean(tape.gradient(score, activation), axis=(1, 2), keepdims=True)
    expected = tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1, keepdims=True)).numpy()
    gradcam = bk.GradCAM(cnn)  # default layer: the last 4-D output with more than one position
    np.testing.assert_allclose(gradcam.layer_map(x, 1).numpy(), expected, rtol=1e-5, atol=1e-7)
    assert gradcam.layer.name == "pooled"
    saliency = gradcam.saliency(x, 1).numpy()
    assert saliency.shape == (2, 8, 8, 1)
    for sample in saliency:
        assert sample.min() == 0.0 and sample.max() == pytest.approx(1.0)
    by_id = bk.GradCAM(cnn, layer=1).layer_map(x, 1)  # leaf ID 1 = "pooled"
    np.testing.assert_allclose(by_id.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_gradcam_layer_errors(cnn: Any) -> None:
    with pytest.raises(ValueError, match="matches 0 layers"):
        bk.GradCAM(cnn, layer="nope")
    with pytest.raises(ValueError, match="not part of the model"):
        bk.GradCAM(cnn, layer=L.Dense(2))
    with pytest.raises(ValueError, match="out of range"):
        bk.GradCAM(cnn, layer=99)
    flat = keras.Sequential([keras.Input((4, 2)), L.Flatten(), L.Dense(2)])
    with pytest.raises(ValueError, match="no layer with a spatial output"):
        bk.GradCAM(flat).saliency(_x((1, 4, 2)))


# -- post-processing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize(
    ("source", "size"), [((3, 5), (8, 8)), ((7, 6), (4, 9)), ((1, 1), (5, 3)), ((4,), (9,))]
)
def test_resize_matches_torch_interpolate(
    source: tuple[int, ...], size: tuple[int, ...], align_corners: bool
) -> None:
    maps = np.random.default_rng(0).normal(size=(2, 3, *source))
    mode = {1: "linear", 2: "bilinear"}[len(source)]
    expected = F.interpolate(torch.from_numpy(maps), size=size, mode=mode, align_corners=align_corners)
    got = resize_to(tf.constant(np.moveaxis(maps, 1, -1)), size, align_corners=align_corners)
    np.testing.assert_allclose(got.numpy(), np.moveaxis(expected.numpy(), 1, -1), rtol=1e-10, atol=1e-12)


def test_channel_sum_minmax_matches_the_pytorch_side() -> None:
    values = np.random.default_rng(1).normal(size=(3, 4, 5, 6))  # NCHW
    expected = torch_channel_sum_minmax(torch.from_numpy(values)).numpy()
    channels_last = channel_sum_minmax(tf.constant(np.moveaxis(values, 1, -1)))
    channels_first = channel_sum_minmax(tf.constant(values), axis=1)
    np.testing.assert_allclose(channels_last.numpy(), np.moveaxis(expected, 1, -1), rtol=1e-12)
    np.testing.assert_allclose(channels_first.numpy(), np.moveaxis(expected, 1, -1), rtol=1e-12)
