"""Every CAM and FullGrad variant on Keras equals PyTorch on the twins with copied weights (float64).

The PyTorch classes are the oracle (they are themselves checked against closed forms, brute force
and pytorch-grad-cam in tests/test_cam_methods.py and tests/test_fullgrad*.py); the Keras classes are
the same classes over the Keras layer backend, so any difference is the backend's: which tensor is
captured, its gradient, its layout, the replaced output, the bias and where it acts.
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
from bbdecoder.attribution.registry import get_method, list_methods  # noqa: E402

from . import zoo, zoo_keras  # noqa: E402
from .zoo_keras_layers import (  # noqa: E402
    KerasBatchNormAct,
    KerasHandRolledBatchNormAct,
    keras_resnet,
    nhwc,
    to_keras_input,
    twin,
)

TOL = {"rtol": 1e-4, "atol": 1e-6}
# Every CAM of the registry: a new CAM is one file plus its registry entry, and is tested here.
CAMS = [spec.name for spec in list_methods(family="cam")]
LAYERS = {"resnet": ["b_conv2", ["stem_bn", "block_out"]], "plain": ["conv2", "relu1"]}


@pytest.fixture(scope="module", params=["resnet", "plain"])
def pair(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, Any, torch.Tensor, Any]:
    torch_model, keras_model, shape = twin(request.param, seed=1)
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return request.param, torch_model, keras_model, x, to_keras_input(x)


def test_every_layer_method_is_registered_for_keras_as_the_shared_class() -> None:
    layer_methods = [spec for spec in list_methods() if spec.family in ("cam", "fullgrad")]
    assert len(CAMS) >= 8 and {"fullgrad", "simple_fullgrad", "smooth_fullgrad"} <= {
        s.name for s in layer_methods
    }
    for spec in layer_methods:
        keras_class, torch_class = spec.load("keras"), spec.load("torch")
        assert issubclass(keras_class, torch_class), (
            spec.name
        )  # written once: the Keras class only adds the backend
        assert getattr(bk, keras_class.__name__) is keras_class
        assert getattr(bbdecoder, torch_class.__name__) is torch_class


def test_the_twins_compute_the_same_function(pair: Any) -> None:
    _, torch_model, keras_model, x, x_tf = pair
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(keras_model(x_tf, training=False).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CAMS)
def test_every_cam_equals_pytorch_on_the_default_layer(pair: Any, name: str) -> None:
    _, torch_model, keras_model, x, x_tf = pair
    torch_cam = get_method(name).load("torch")(torch_model)
    keras_cam = get_method(name).load("keras")(keras_model)
    target = [0, 2, 1]
    expected = torch_cam.saliency(x, target)
    got = keras_cam.saliency(x_tf, target)
    assert isinstance(got, tf.Tensor) and tuple(got.shape) == (3, *x.shape[2:], 1)
    assert keras_cam.layer_names == torch_cam.layer_names  # the same trunk map, by the same name
    np.testing.assert_allclose(got.numpy(), nhwc(expected), **TOL)
    np.testing.assert_allclose(
        keras_cam.layer_map(x_tf, None).numpy(), nhwc(torch_cam.layer_map(x, None)), **TOL
    )
    # the pytorch-grad-cam call: (N, H, W) float32 on both
    np.testing.assert_allclose(keras_cam(x_tf, target), torch_cam(x, target), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CAMS)
def test_every_cam_equals_pytorch_on_named_layers(pair: Any, name: str) -> None:
    net, torch_model, keras_model, x, x_tf = pair
    for layer in LAYERS[net]:
        torch_cam = get_method(name).load("torch")(torch_model, layer)
        keras_cam = get_method(name).load("keras")(keras_model, layer=layer)
        np.testing.assert_allclose(
            keras_cam.saliency(x_tf, 1).numpy(), nhwc(torch_cam.saliency(x, 1)), **TOL, err_msg=str(layer)
        )
        for got, expected in zip(keras_cam.layer_maps(x_tf, 1), torch_cam.layer_maps(x, 1), strict=True):
            np.testing.assert_allclose(got.numpy(), nhwc(expected), **TOL, err_msg=str(layer))


def test_perturbation_cams_batch_in_chunks_with_per_sample_targets(pair: Any) -> None:
    _, _, keras_model, _, x_tf = pair
    for cls in (bk.ScoreCAM, bk.AblationCAM):
        whole = cls(keras_model, batch_size=64).saliency(x_tf, [2, 0, 1])
        chunked = cls(keras_model, batch_size=5).saliency(x_tf, [2, 0, 1])
        one_by_one = np.concatenate(
            [cls(keras_model).saliency(x_tf[i : i + 1], [c]).numpy() for i, c in enumerate([2, 0, 1])]
        )
        np.testing.assert_allclose(chunked.numpy(), whole.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(one_by_one, whole.numpy(), rtol=1e-10, atol=1e-12)


def test_fullgrad_decomposition_saliency_and_completeness_equal_pytorch(pair: Any) -> None:
    _, torch_model, keras_model, x, x_tf = pair
    shape = tuple(x.shape[1:])
    torch_fullgrad = bbdecoder.FullGrad(torch_model, im_size=shape)
    keras_fullgrad = bk.FullGrad(keras_model, im_size=(*shape[1:], shape[0]))  # checked on construction
    expected = torch_fullgrad.decompose(x, [1, 0, 4 % 3])
    got = keras_fullgrad.decompose(x_tf, [1, 0, 4 % 3])
    assert float(tf.reduce_max(got.relative_error())) < 1e-10  # complete in float64, fused BN+ReLU too
    np.testing.assert_allclose(got.input_gradient.numpy(), nhwc(expected.input_gradient), **TOL)
    # PyTorch lists bias gradients in backward order, Keras in call order: compare layer by layer.
    by_name = dict(zip(expected.layer_names, expected.bias_gradients, strict=True))
    assert sorted(by_name) == sorted(got.layer_names)
    for name, gradient in zip(got.layer_names, got.bias_gradients, strict=True):
        np.testing.assert_allclose(gradient.numpy(), nhwc(by_name[name]), **TOL, err_msg=name)
    np.testing.assert_allclose(
        keras_fullgrad.saliency(x_tf, 2).numpy(), nhwc(torch_fullgrad.saliency(x, 2)), **TOL
    )
    np.testing.assert_allclose(
        keras_fullgrad.last_relative_error.numpy(), torch_fullgrad.last_relative_error.numpy(), atol=1e-10
    )
    np.testing.assert_allclose(
        keras_fullgrad.attribute(x_tf, 2).numpy(), nhwc(torch_fullgrad.attribute(x, 2)), **TOL
    )


def test_simple_and_smooth_fullgrad_equal_pytorch(pair: Any) -> None:
    _, torch_model, keras_model, x, x_tf = pair
    np.testing.assert_allclose(
        bk.SimpleFullGrad(keras_model).saliency(x_tf, None).numpy(),
        nhwc(bbdecoder.SimpleFullGrad(torch_model).saliency(x, None)),
        **TOL,
    )
    options = {"n_samples": 3, "noise_level": 0.1, "seed": 5}
    np.testing.assert_allclose(
        bk.SmoothFullGrad(keras_model, **options).saliency(x_tf, [0, 1, 2]).numpy(),
        nhwc(bbdecoder.SmoothFullGrad(torch_model, **options).saliency(x, [0, 1, 2])),
        **TOL,
    )


# -- BatchNorm with its activation inside ------------------------------------------------------------
def test_fullgrad_reads_a_fused_batchnorm_before_its_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The BN subclass's bias gradient is taken at the stock call's output, before its ReLU."""
    _, keras_model, _ = twin("resnet", seed=3)
    x = torch.randn((4, 3, 12, 12), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_tf = to_keras_input(x)
    assert isinstance(keras_model.get_layer("stem_bn"), KerasBatchNormAct)
    assert bk.FullGrad(keras_model).checkCompleteness(x_tf) < 1e-10
    assert vars(keras.layers.BatchNormalization)["call"].__qualname__ == "BatchNormalization.call"
    # Read at the layer's output (after the ReLU), as a plain interception would, it is not complete.
    import bbdecoder.backends.layers_keras as layers_keras

    monkeypatch.setattr(layers_keras, "stock_class", lambda layer: None)
    with pytest.raises(bk.CompletenessError):
        bk.FullGrad(keras_model).checkCompleteness(x_tf)


def test_a_subclass_that_never_reaches_the_stock_call_is_refused_by_name() -> None:
    _, keras_model, _ = twin("resnet", seed=3)
    model = keras_resnet(norm=KerasHandRolledBatchNormAct)
    model.set_weights(keras_model.get_weights())
    x_tf = to_keras_input(torch.randn((2, 3, 12, 12), dtype=torch.float64))
    with pytest.raises(bbdecoder.UnreachableBiasError, match="stem_bn"):
        bk.FullGrad(model).saliency(x_tf)
    with pytest.raises(bbdecoder.UnreachableBiasError, match="stem_bn"):
        bk.FullGrad(model, check=False).saliency(x_tf)
    assert bk.SimpleFullGrad(model).saliency(x_tf).shape == (2, 12, 12, 1)  # falls back to the output
    assert not any("call" in vars(layer) for layer in model._flatten_layers())


# -- softmax heads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fullgrad", "simple_fullgrad", "gradcam", "scorecam", "ablationcam"])
def test_a_softmax_head_is_looked_through_and_the_logits_explained(name: str) -> None:
    """``keras.applications`` ends in Dense(activation="softmax"): the maps are the logits' maps."""
    torch_model, keras_model, _ = twin("resnet", seed=7)
    head = keras_resnet(head_activation="softmax")
    head.set_weights(keras_model.get_weights())
    x = torch.randn((2, 3, 12, 12), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x_tf = to_keras_input(x)
    assert np.allclose(head(x_tf).numpy().sum(axis=1), 1.0)  # it does output probabilities
    cls = get_method(name).load("keras")
    expected = get_method(name).load("torch")(torch_model).saliency(x, [3, 1])
    np.testing.assert_allclose(cls(head).saliency(x_tf, [3, 1]).numpy(), nhwc(expected), **TOL)
    assert head.get_layer("fc").activation.__name__ == "softmax"  # restored
    if name == "fullgrad":
        assert bk.FullGrad(head).checkCompleteness(x_tf) < 1e-10


# -- no trace left ----------------------------------------------------------------------------------
def test_the_keras_model_is_left_exactly_as_it_was_also_on_errors() -> None:
    _, model, _ = twin("resnet", seed=6)
    x_tf = to_keras_input(torch.randn((2, 3, 12, 12), dtype=torch.float64))
    before = [w.copy() for w in model.get_weights()]
    output = model(x_tf, training=False).numpy()
    stock_call = vars(keras.layers.BatchNormalization)["call"]
    for name in CAMS:
        cls = get_method(name).load("keras")
        cls(model).saliency(x_tf, 1)
        with pytest.raises(bk.TargetError):
            cls(model).saliency(x_tf, 99)
    bk.FullGrad(model).saliency(x_tf)
    with pytest.raises(Exception, match=r"(?i)shape|incompatible|expected"):
        bk.FullGrad(model, check=False).saliency(tf.zeros((1, 12, 12, 5), tf.float64))
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    assert not any("call" in vars(layer) for layer in model._flatten_layers())
    assert vars(keras.layers.BatchNormalization)["call"] is stock_call
    np.testing.assert_array_equal(model(x_tf, training=False).numpy(), output)


def test_layer_selection_errors_name_the_problem() -> None:
    _, model, _ = twin("plain")
    with pytest.raises(ValueError, match="matches 0 layers"):
        bk.GradCAM(model, layer="nope")
    with pytest.raises(ValueError, match="matches 0 layers"):
        bk.GradCAM(model, layer="blocks.*")
    assert bk.GradCAM(model, layer="relu*").layer_names == ["relu1", "relu2"]
    assert bk.HiResCAM(model, layer=keras.layers.ReLU).layer_names == ["relu1", "relu2"]
    with pytest.raises(ValueError, match="eval_mode=False is not supported on Keras"):
        bk.GradCAM(model, eval_mode=False)
    flat = keras.Sequential([keras.Input((4, 2)), keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no layer with a spatial output"):
        bk.GradCAM(flat).saliency(tf.zeros((1, 4, 2)))


# -- the shared zoo (tests/zoo.py) and its Keras twins (tests/zoo_keras.py) ---------------------------
LAYER_METHODS = [spec.name for spec in list_methods(framework="keras") if spec.family in ("cam", "fullgrad")]
ZOO_TWINS = [*sorted(zoo.ZOO), "softmax_layer"]
FAST = {
    "smooth_fullgrad": {"n_samples": 2, "seed": 3},
    "scorecam": {"batch_size": 7},
    "ablationcam": {"batch_size": 5},
}


@pytest.fixture(scope="module")
def zoo_twins() -> dict[str, tuple[torch.nn.Module, Any, torch.Tensor, Any]]:
    pairs = {}
    x = zoo.zoo_input(3, seed=1, float64=True)
    for name in ZOO_TWINS:
        source = "softmax_head" if name == "softmax_layer" else name
        torch_model = zoo.ZOO[source](0, float64=True)
        keras_model = zoo_keras.twin(source, torch_model, float64=True, variant=name)
        pairs[name] = (torch_model, keras_model, x, tf.constant(zoo_keras.nhwc(x)))
    return pairs


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("name", ZOO_TWINS)
def test_every_layer_method_equals_pytorch_on_the_zoo_twins(zoo_twins: Any, method: str, name: str) -> None:
    torch_model, keras_model, x, x_tf = zoo_twins[name]
    target: Any = (lambda out: out["logits"][:, 2]) if name == "model_output" else [0, 3, 1]
    spec = get_method(method)
    options = FAST.get(method, {})
    expected = spec.load("torch")(torch_model, **options).saliency(x, target)
    got = spec.load("keras")(keras_model, **options).saliency(x_tf, target)
    assert isinstance(got, tf.Tensor) and got.dtype == tf.float64
    assert float(expected.abs().max()) > 0, "a comparison of zeros proves nothing"
    np.testing.assert_allclose(
        got.numpy(), nhwc(expected), rtol=1e-8, atol=1e-10, err_msg=f"{method} on {name}"
    )


def test_a_token_layer_with_reshape_tokens_gives_the_map_of_the_channels_last_layer() -> None:
    """(N, H*W, C) tokens of a conv map, laid back on the grid by ``tokens()``: the same map."""
    from bbdecoder import tokens

    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3), dtype="float64")
    h = keras.layers.Conv2D(5, 3, padding="same", activation="relu", name="conv", dtype="float64")(inputs)
    t = keras.layers.Reshape((64, 5), name="tokens", dtype="float64")(h)
    t = keras.layers.Dense(5, activation="tanh", dtype="float64")(t)
    model = keras.Model(
        inputs, keras.layers.Dense(3, dtype="float64")(keras.layers.Flatten(dtype="float64")(t))
    )
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 8, 8, 3)))
    for name in ("GradCAM", "HiResCAM", "ScoreCAM", "AblationCAM"):
        cls = getattr(bk, name)
        expected = cls(model, layer="conv").saliency(x, 1).numpy()
        got = cls(model, layer="tokens", reshape=tokens()).saliency(x, 1).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match="reshape"):
        bk.GradCAM(model, layer="tokens").saliency(x, 1)
