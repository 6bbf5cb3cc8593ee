"""The same CNN in PyTorch (NCHW) and Keras (NHWC) with copied weights gives the same maps.

Conv kernels are copied (out, in, kh, kw) -> (kh, kw, in, out), BatchNorm's statistics and affine
parameters as they are, the Dense after global average pooling transposed (no flatten-order issue).
The PyTorch explainers are the oracle for FullGrad (decomposition and saliency), Integrated Gradients,
Gradient, Grad-CAM and SmoothGrad (same seed, same noise).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

tf = pytest.importorskip(
    "tensorflow", reason="the Keras port needs TensorFlow: pip install bbdecoder[tensorflow]"
)

import keras  # noqa: E402

import bbdecoder.keras as bk  # noqa: E402
from bbdecoder.attribution.fullgrad import FullGrad as TorchFullGrad  # noqa: E402
from bbdecoder.attribution.gradcam import GradCAM as TorchGradCAM  # noqa: E402
from bbdecoder.attribution.gradient import Gradient as TorchGradient  # noqa: E402
from bbdecoder.attribution.integrated_gradients import IntegratedGradients as TorchIG  # noqa: E402
from bbdecoder.attribution.smoothgrad import SmoothGrad as TorchSmoothGrad  # noqa: E402

L = keras.layers
TOL = {"rtol": 1e-4, "atol": 1e-4}


class TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu1(self.bn1(self.conv1(x))))
        r = self.relu2(self.conv2(h))
        h = self.relu3(self.conv3(r) + h)
        return self.fc(h.mean(dim=(2, 3)))


def keras_net() -> Any:
    inputs = keras.Input((12, 12, 3))
    h = L.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    h = L.BatchNormalization(epsilon=1e-5, name="bn1")(h)
    h = L.MaxPooling2D(2)(L.ReLU()(h))
    r = L.Conv2D(4, 3, padding="same", activation="relu", name="conv2")(h)  # fused ReLU
    h = L.ReLU(name="relu3")(L.Add()([L.Conv2D(4, 3, padding="same", name="conv3")(r), h]))
    outputs = L.Dense(5, name="fc")(L.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs)


def copy_weights(source: TorchNet, target: Any) -> None:
    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy()

    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(source, name)
        target.get_layer(name).set_weights([numpy(conv.weight.permute(2, 3, 1, 0)), numpy(conv.bias)])
    bn = source.bn1
    target.get_layer("bn1").set_weights(
        [numpy(bn.weight), numpy(bn.bias), numpy(bn.running_mean), numpy(bn.running_var)]
    )
    target.get_layer("fc").set_weights([numpy(source.fc.weight.T), numpy(source.fc.bias)])


@pytest.fixture(scope="module")
def pair() -> tuple[TorchNet, Any, torch.Tensor, Any]:
    torch.manual_seed(0)
    torch_model = TorchNet()
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.normal_(0, 0.5)
        torch_model.bn1.running_mean.uniform_(-1, 1)
        torch_model.bn1.running_var.uniform_(0.5, 2)
        torch_model.bn1.weight.uniform_(0.5, 1.5)
        torch_model.bn1.bias.uniform_(-1, 1)
    torch_model.eval()
    keras_model = keras_net()
    copy_weights(torch_model, keras_model)
    x = torch.randn(3, 3, 12, 12)
    return torch_model, keras_model, x, tf.constant(x.permute(0, 2, 3, 1).numpy())


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def test_the_two_models_compute_the_same_function(pair: tuple[TorchNet, Any, torch.Tensor, Any]) -> None:
    torch_model, keras_model, x, x_tf = pair
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(keras_model(x_tf, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fullgrad_decomposition_and_saliency_match(pair: tuple[TorchNet, Any, torch.Tensor, Any]) -> None:
    torch_model, keras_model, x, x_tf = pair
    target = [0, 3, 4]
    torch_fullgrad = TorchFullGrad(torch_model, im_size=(3, 12, 12))
    keras_fullgrad = bk.FullGrad(keras_model, im_size=(12, 12, 3))
    expected = torch_fullgrad.decompose(x, target)
    got = keras_fullgrad.decompose(x_tf, target)
    np.testing.assert_allclose(got.input_gradient.numpy(), _nhwc(expected.input_gradient), **TOL)
    # Torch lists bias gradients in backward order, Keras in call order: compare per layer.
    expected_by_layer = {
        name: grad.detach() for name, grad in zip(expected.layer_names, expected.bias_gradients, strict=True)
    }
    assert sorted(expected_by_layer) == sorted(got.layer_names)
    for name, grad in zip(got.layer_names, got.bias_gradients, strict=True):
        reference = expected_by_layer[name]
        reference_np = _nhwc(reference) if reference.dim() == 4 else reference.numpy()
        np.testing.assert_allclose(grad.numpy(), reference_np, **TOL, err_msg=name)
    saliency = keras_fullgrad.saliency(x_tf, target).numpy()
    np.testing.assert_allclose(saliency, _nhwc(torch_fullgrad.saliency(x, target)), **TOL)
    assert saliency.shape == (3, 12, 12, 1)


def test_integrated_gradients_match(pair: tuple[TorchNet, Any, torch.Tensor, Any]) -> None:
    torch_model, keras_model, x, x_tf = pair
    for baseline, method in (("black", "riemann_trapezoid"), ("uniform", "gausslegendre")):
        expected, expected_delta = TorchIG(torch_model).attribute(
            x, target=None, baseline=baseline, n_steps=12, method=method, return_convergence_delta=True
        )
        got, delta = bk.IntegratedGradients(keras_model).attribute(
            x_tf, target=None, baseline=baseline, n_steps=12, method=method, return_convergence_delta=True,
            internal_batch_size=7,
        )  # fmt: skip
        np.testing.assert_allclose(got.numpy(), _nhwc(expected), **TOL, err_msg=baseline)
        np.testing.assert_allclose(delta.numpy(), expected_delta.numpy(), **TOL)


def test_gradient_gradcam_and_smoothgrad_match(pair: tuple[TorchNet, Any, torch.Tensor, Any]) -> None:
    torch_model, keras_model, x, x_tf = pair
    np.testing.assert_allclose(
        bk.Gradient(keras_model).attribute(x_tf, 2).numpy(),
        _nhwc(TorchGradient(torch_model).attribute(x, 2)),
        **TOL,
    )
    cam = bk.GradCAM(keras_model, layer="relu3").saliency(x_tf, target=[1, 1, 2]).numpy()
    torch_cam = TorchGradCAM(torch_model, layer=torch_model.relu3).saliency(x, target=[1, 1, 2])
    np.testing.assert_allclose(cam, _nhwc(torch_cam), **TOL)
    default = bk.GradCAM(keras_model)
    default.layer_map(x_tf)
    assert default.layer_names == ["relu3"]
    smooth = bk.SmoothGrad(keras_model, n_samples=3, noise_level=0.1, seed=4).attribute(x_tf, target=None)
    torch_smooth = TorchSmoothGrad(torch_model, n_samples=3, noise_level=0.1, seed=4).attribute(
        x, target=None
    )
    np.testing.assert_allclose(smooth.numpy(), _nhwc(torch_smooth), **TOL)
