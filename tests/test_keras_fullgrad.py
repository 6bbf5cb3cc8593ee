"""FullGrad / Simple FullGrad for Keras 3 models: completeness on functional, Sequential and
subclassed CNNs (nested blocks, residual adds, shared layers, fused activations), an independent
oracle for the bias gradients (the gradient with respect to the bias variables themselves), a
brute-force saliency, and the model left exactly as it was."""

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

from bbdecoder.backends.layers_keras import effective_bias, is_bias_layer  # noqa: E402
from bbdecoder.keras import CompletenessError, FullGrad, SimpleFullGrad, TargetError  # noqa: E402

L = keras.layers


def randomize(model: Any, seed: int = 0) -> Any:
    """Random biases and BatchNorm statistics: Keras initialises biases (and BN's effective bias) to 0."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            values = {
                "gamma": rng.uniform(0.5, 1.5, channels),
                "beta": rng.uniform(-1, 1, channels),
                "moving_mean": rng.uniform(-1, 1, channels),
                "moving_variance": rng.uniform(0.5, 2.0, channels),
            }
            for name, value in values.items():
                variable = getattr(layer, name, None)
                if variable is not None:
                    variable.assign(value.astype("float32"))
        elif is_bias_layer(layer) and getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape).astype("float32"))
    return model


def functional_net() -> Any:
    """Conv (fused ReLU) / BN / residual add / shared conv called twice / max-pool / GAP / Dense."""
    inputs = keras.Input((12, 12, 3))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    h = L.BatchNormalization(name="bn")(h)
    shared = L.Conv2D(4, 3, padding="same", name="shared")
    r = L.ReLU()(shared(h))
    r = shared(r)
    h = L.ReLU()(L.Add()([h, r]))
    h = L.MaxPooling2D(2)(h)
    h = L.Conv2D(6, 3, padding="valid", name="narrow")(h)
    h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    outputs = L.Dense(5, name="head")(h)
    return randomize(keras.Model(inputs, outputs), seed=1)


def sequential_net() -> Any:
    """Depthwise / separable / transposed convs, BN without scale, average pooling, Flatten + Dense."""
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(4, 3, padding="same"),
            L.BatchNormalization(scale=False),
            L.ReLU(),
            L.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
            L.ReLU(),
            L.SeparableConv2D(3, 3, padding="same"),
            L.AveragePooling2D(2),
            L.Conv2DTranspose(3, 2, strides=2),
            L.BatchNormalization(center=False),
            L.ReLU(),
            L.Flatten(),
            L.Dense(7, activation="relu"),
            L.Dense(4),
        ]
    )
    return randomize(model, seed=2)


class ResidualBlock(L.Layer):
    def __init__(self, channels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv1 = L.Conv2D(channels, 3, padding="same")
        self.bn1 = L.BatchNormalization()
        self.conv2 = L.Conv2D(channels, 3, padding="same")
        self.bn2 = L.BatchNormalization()

    def call(self, x: Any, training: Any = None) -> Any:
        h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        h = self.bn2(self.conv2(h), training=training)
        return keras.ops.relu(h + x)


class SubclassedNet(keras.Model):
    """Nested custom block, a nested Sequential head and a layer that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = L.Conv2D(4, 3, padding="same", activation="relu")
        self.block = ResidualBlock(4)
        self.pool = L.MaxPooling2D(2)
        self.unused = L.Dense(3)
        self.unused.build((None, 4))
        self.head = keras.Sequential([L.GlobalAveragePooling2D(), L.Dense(6), L.ReLU(), L.Dense(5)])

    def call(self, x: Any, training: Any = None) -> Any:
        return self.head(self.pool(self.block(self.stem(x), training=training)))


def subclassed_net() -> Any:
    model = SubclassedNet()
    model(tf.zeros((1, 8, 8, 3)))
    return randomize(model, seed=3)


def conv1d_net() -> Any:
    model = keras.Sequential(
        [keras.Input((16, 2)), L.Conv1D(3, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
         L.MaxPooling1D(2), L.Conv1D(4, 3), L.ReLU(), L.GlobalAveragePooling1D(), L.Dense(3)]
    )  # fmt: skip
    return randomize(model, seed=4)


NETS = {
    "functional": (functional_net, (12, 12, 3)),
    "sequential": (sequential_net, (8, 8, 2)),
    "subclassed": (subclassed_net, (8, 8, 3)),
    "conv1d": (conv1d_net, (16, 2)),
}


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request: pytest.FixtureRequest) -> tuple[Any, tuple[int, ...]]:
    build, im_size = NETS[request.param]
    keras.utils.set_random_seed(0)
    return build(), im_size


def _inputs(im_size: tuple[int, ...], n: int = 3, seed: int = 0) -> Any:
    return tf.constant(np.random.default_rng(seed).normal(size=(n, *im_size)).astype("float32"))


def test_completeness_holds_on_every_architecture(net: tuple[Any, tuple[int, ...]]) -> None:
    model, im_size = net
    fullgrad = FullGrad(model, im_size=im_size)  # checks on construction
    decomposition = fullgrad.decompose(_inputs(im_size), target=[0, 1, 2])
    assert float(tf.reduce_max(decomposition.relative_error())) < 1e-4
    # A real decomposition: the biases carry a sizeable share of F(x).
    bias_share = sum(float(tf.reduce_sum(tf.abs(g))) for g in decomposition.bias_gradients)
    assert bias_share > 0.05 * float(tf.reduce_sum(tf.abs(decomposition.scores)))


def test_bias_gradients_match_the_gradient_with_respect_to_the_bias_variables(
    net: tuple[Any, tuple[int, ...]],
) -> None:
    """Oracle without interception: sum(dF/d out_l * b_l) = sum_c (dF/db_c) * b_c per layer (BN: beta)."""
    model, im_size = net
    x = _inputs(im_size, n=2, seed=5)
    decomposition = FullGrad(model, check=False).decompose(x, target=1)
    per_layer: dict[str, float] = {}
    for name, gradient in zip(decomposition.layer_names, decomposition.bias_gradients, strict=True):
        per_layer[name] = per_layer.get(name, 0.0) + float(tf.reduce_sum(gradient))

    layers = [layer for layer in model._flatten_layers() if is_bias_layer(layer)]
    oracle_vars = [
        getattr(layer, "beta" if isinstance(layer, L.BatchNormalization) else "bias", None)
        for layer in layers
    ]
    checked = [(layer, v) for layer, v in zip(layers, oracle_vars, strict=True) if v is not None]
    with tf.GradientTape() as tape:
        score = tf.reduce_sum(model(x, training=False)[:, 1])
    grads = tape.gradient(
        score, [v.value for _, v in checked], unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    for (layer, _), grad in zip(checked, grads, strict=True):
        expected = float(tf.reduce_sum(grad * effective_bias(layer, tf.float32)))
        assert per_layer.get(layer.name, 0.0) == pytest.approx(expected, rel=1e-4, abs=1e-5), layer.name


def test_shared_layer_contributes_once_per_call_and_unused_layers_not_at_all() -> None:
    model = functional_net()
    names = FullGrad(model, check=False).decompose(_inputs((12, 12, 3)), 0).layer_names
    assert names.count("shared") == 2
    assert names == ["stem", "bn", "shared", "shared", "narrow", "head"]
    sub = subclassed_net()
    sub_names = FullGrad(sub, check=False).decompose(_inputs((8, 8, 3)), 0).layer_names
    assert sub.unused.name not in sub_names
    assert len(sub_names) == 7  # stem, 2 conv + 2 bn in the block, 2 dense in the head


def test_saliency_equals_brute_force_aggregation(net: tuple[Any, tuple[int, ...]]) -> None:
    """psi per element over (spatial, C), channel sum, then torch's align_corners=True upsampling."""
    model, im_size = net
    x = _inputs(im_size, n=2, seed=7)
    fullgrad = FullGrad(model, im_size=im_size)
    saliency = fullgrad.saliency(x, target=2).numpy()
    decomposition = fullgrad.decompose(x, target=2)

    def psi_channel_sum(values: np.ndarray) -> np.ndarray:  # (N, *spatial, C) -> (N, 1, *spatial)
        magnitude = np.abs(values.astype(np.float64))
        out = []
        for sample in magnitude:
            scaled = (sample - sample.min()) / (sample.max() - sample.min() + 1e-6)
            out.append(scaled.sum(axis=-1)[None])
        return np.stack(out)

    spatial = tuple(im_size[:-1])
    mode = {1: "linear", 2: "bilinear"}[len(spatial)]
    expected = psi_channel_sum((decomposition.inputs * decomposition.input_gradient).numpy())
    for gradient in decomposition.bias_gradients:
        if gradient.shape.rank != x.shape.rank:
            continue
        layer_map = torch.from_numpy(psi_channel_sum(gradient.numpy()))
        if tuple(layer_map.shape[2:]) != spatial:
            layer_map = F.interpolate(layer_map, size=spatial, mode=mode, align_corners=True)
        expected = expected + layer_map.numpy()
    assert saliency.shape == (2, *spatial, 1)
    np.testing.assert_allclose(saliency, np.moveaxis(expected, 1, -1), rtol=1e-5, atol=1e-5)
    assert saliency.min() >= 0
    assert float(tf.reduce_max(fullgrad.last_relative_error)) < 1e-4


def test_simple_fullgrad_uses_the_plain_output_gradients(net: tuple[Any, tuple[int, ...]]) -> None:
    model, im_size = net
    x = _inputs(im_size, n=2, seed=8)
    simple = SimpleFullGrad(model).saliency(x, target=0)
    full = FullGrad(model, check=False).saliency(x, target=0)
    assert simple.shape == full.shape == (2, *im_size[:-1], 1)
    assert float(tf.reduce_min(simple)) >= 0
    assert not np.allclose(simple.numpy(), full.numpy())
    np.testing.assert_allclose(
        SimpleFullGrad(model).attribute(x, 0).numpy(), FullGrad(model, check=False).attribute(x, 0).numpy()
    )


def test_fused_activation_is_split_at_the_pre_activation_output() -> None:
    """Recording a Conv2D(activation='relu') after its ReLU would break completeness: this must hold."""
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    h = L.Conv2D(3, 3, padding="same", activation="relu")(h)
    outputs = L.Dense(2)(L.Flatten()(h))
    model = randomize(keras.Model(inputs, outputs), seed=9)
    assert FullGrad(model).checkCompleteness(_inputs((6, 6, 2), n=4)) < 1e-4


def test_non_bias_constants_fail_the_check_and_simple_fullgrad_still_works() -> None:
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same")(inputs)
    h = L.LayerNormalization()(h)
    h = L.ReLU()(h)
    outputs = L.Dense(2)(L.GlobalAveragePooling2D()(h))
    model = randomize(keras.Model(inputs, outputs), seed=10)
    with pytest.raises(CompletenessError, match="relative error") as info:
        FullGrad(model, im_size=(6, 6, 2))
    assert info.value.rel_error > 1e-4
    fullgrad = FullGrad(model, check=False)
    assert fullgrad.saliency(_inputs((6, 6, 2))).shape == (3, 6, 6, 1)
    simple = SimpleFullGrad(model).saliency(_inputs((6, 6, 2)))
    assert bool(tf.reduce_all(tf.math.is_finite(simple)))


def test_reference_interface_and_aliases() -> None:
    model = functional_net()
    fullgrad = FullGrad(model, im_size=(12, 12, 3))
    x = _inputs((12, 12, 3), n=2)
    input_grad, bias_grads = fullgrad.fullGradientDecompose(x, target_class=3)
    assert input_grad.shape == x.shape
    assert [tuple(g.shape) for g in bias_grads][-1] == (2, 5)
    again, _ = fullgrad.full_gradient_decompose(x, 3)
    np.testing.assert_array_equal(again.numpy(), input_grad.numpy())
    assert fullgrad.check_completeness() == fullgrad.checkCompleteness()
    np.testing.assert_allclose(
        fullgrad.saliency(x, target_class=3).numpy(), fullgrad.saliency(x, target=3).numpy(), rtol=1e-6
    )


def _state(model: Any) -> list[Any]:
    layers = model._flatten_layers()
    return [
        [v.numpy().copy() for v in model.weights],
        [(layer.name, layer.trainable, sorted(vars(layer))) for layer in layers],
        [vars(layer).get("activation") for layer in layers],
    ]


def _assert_same_state(before: list[Any], after: list[Any]) -> None:
    for old, new in zip(before[0], after[0], strict=True):
        np.testing.assert_array_equal(old, new)
    assert before[1] == after[1]
    assert all(a is b for a, b in zip(before[2], after[2], strict=True))


def test_model_is_unchanged_also_when_the_forward_pass_raises() -> None:
    model = functional_net()
    before = _state(model)
    x = _inputs((12, 12, 3))
    output_before = model(x, training=False).numpy()
    fullgrad = FullGrad(model, im_size=(12, 12, 3))
    fullgrad.saliency(_inputs((12, 12, 3)), target=None)
    SimpleFullGrad(model).saliency(_inputs((12, 12, 3)))
    with pytest.raises(TargetError, match="out of range"):
        fullgrad.saliency(_inputs((12, 12, 3)), target=99)
    with pytest.raises(Exception, match=r"(?i)shape|incompatible|expected"):
        fullgrad.decompose(_inputs((12, 12, 5)), target=0)  # wrong channel count: Keras raises mid-forward
    _assert_same_state(before, _state(model))
    assert not any("call" in vars(layer) for layer in model._flatten_layers())
    # The model still computes exactly what it computed before the explainers ran.
    np.testing.assert_array_equal(model(x, training=False).numpy(), output_before)


def test_batchnorm_is_evaluated_with_its_moving_statistics() -> None:
    model = keras.Sequential([keras.Input((4, 4, 2)), L.BatchNormalization(), L.Flatten(), L.Dense(2)])
    randomize(model, seed=11)
    decomposition = FullGrad(model, check=False).decompose(_inputs((4, 4, 2)), 0)
    assert float(tf.reduce_max(decomposition.relative_error())) < 1e-5
    moving_mean = model.layers[0].moving_mean.numpy().copy()
    FullGrad(model, im_size=(4, 4, 2)).saliency(_inputs((4, 4, 2), n=5))
    np.testing.assert_array_equal(moving_mean, model.layers[0].moving_mean.numpy())


def test_bad_inputs_give_clear_errors() -> None:
    model = functional_net()
    fullgrad = FullGrad(model, im_size=(12, 12, 3))
    with pytest.raises(ValueError, match="batch dimension"):
        fullgrad.saliency(_inputs((12, 12, 3), n=1)[0])
    with pytest.raises(TypeError, match="floating point"):
        fullgrad.saliency(np.zeros((1, 12, 12, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="Keras 3 model"):
        FullGrad(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="im_size"):
        FullGrad(model).checkCompleteness()
