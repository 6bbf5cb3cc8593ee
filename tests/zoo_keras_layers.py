"""PyTorch nets and their Keras twins with copied weights, for the layer methods (CAMs, FullGrad).

Each twin computes the same function (float64 on both sides): conv kernels copied (out, in, kh, kw)
-> (kh, kw, in, out), BatchNorm's affine parameters and running statistics as they are, Dense
weights transposed. Layers carry the same names on both sides, so a layer is chosen by the same name.

* ``resnet``: a stem whose BatchNorm applies its ReLU inside (timm's ``BatchNormAct2d`` on PyTorch; a
  ``BatchNormalization`` subclass calling ``super().call`` then ReLU on Keras), max-pool, a residual
  block (a conv with a fused ``activation="relu"`` on Keras, conv + ReLU module on PyTorch; conv + BN;
  add; ReLU), global average pool, a linear head. Piecewise linear: FullGrad is complete.
* ``plain``: conv, ReLU, conv with stride 2, BN, ReLU, flatten, linear (a head that depends on the
  position, so Grad-CAM and HiResCAM differ).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

L = keras.layers
DTYPE = "float64"


class TorchBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, trimmed: F.batch_norm on the module's own buffers, then its ReLU child."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )
        return self.act(x)


class KerasBatchNormAct(L.BatchNormalization):
    """The same pattern on Keras: a BatchNormalization whose ``call`` also applies the activation."""

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        return keras.ops.relu(super().call(inputs, training=training, mask=mask))


class KerasHandRolledBatchNormAct(L.BatchNormalization):
    """A subclass that normalises by hand and never reaches the Keras layer's own ``call``."""

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        scale = self.gamma * keras.ops.rsqrt(self.moving_variance + self.epsilon)
        return keras.ops.relu((inputs - self.moving_mean) * scale + self.beta)


class TorchResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = TorchBatchNormAct2d(6)
        self.pool = nn.MaxPool2d(2)
        self.b_conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.b_relu1 = nn.ReLU()
        self.b_conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.b_bn2 = nn.BatchNorm2d(6)
        self.block_out = nn.ReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stem_bn(self.stem_conv(x)))
        r = self.b_bn2(self.b_conv2(self.b_relu1(self.b_conv1(h))))
        return self.fc(self.block_out(r + h).mean(dim=(2, 3)))


def keras_resnet(norm: type = KerasBatchNormAct, head_activation: str | None = None) -> Any:
    inputs = keras.Input((12, 12, 3), dtype=DTYPE)
    kw: dict[str, Any] = {"padding": "same", "dtype": DTYPE}
    h = L.Conv2D(6, 3, name="stem_conv", **kw)(inputs)
    h = norm(epsilon=1e-5, name="stem_bn", dtype=DTYPE)(h)
    h = L.MaxPooling2D(2, name="pool", dtype=DTYPE)(h)
    r = L.Conv2D(6, 3, activation="relu", name="b_conv1", **kw)(h)  # fused ReLU
    r = L.Conv2D(6, 3, name="b_conv2", **kw)(r)
    r = L.BatchNormalization(epsilon=1e-5, name="b_bn2", dtype=DTYPE)(r)
    h = L.ReLU(name="block_out", dtype=DTYPE)(L.Add(dtype=DTYPE)([r, h]))
    h = L.GlobalAveragePooling2D(dtype=DTYPE)(h)
    return keras.Model(inputs, L.Dense(5, activation=head_activation, name="fc", dtype=DTYPE)(h))


class TorchPlain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(5 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.bn2(self.conv2(self.relu1(self.conv1(x)))))
        # Keras flattens (H, W, C) in that order: flatten the same order here.
        return self.fc(h.permute(0, 2, 3, 1).flatten(1))


def keras_plain() -> Any:
    inputs = keras.Input((11, 11, 2), dtype=DTYPE)  # odd: TF and torch pad stride 2 alike
    h = L.Conv2D(4, 3, padding="same", name="conv1", dtype=DTYPE)(inputs)
    h = L.ReLU(name="relu1", dtype=DTYPE)(h)
    h = L.Conv2D(5, 3, strides=2, padding="same", name="conv2", dtype=DTYPE)(h)
    h = L.BatchNormalization(epsilon=1e-5, name="bn2", dtype=DTYPE)(h)
    h = L.ReLU(name="relu2", dtype=DTYPE)(h)
    h = L.Flatten(dtype=DTYPE)(h)
    return keras.Model(inputs, L.Dense(3, name="fc", dtype=DTYPE)(h))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero biases and BatchNorm statistics (the defaults would make every bias term vanish)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model.double().eval()


def copy_weights(source: nn.Module, target: Any) -> Any:
    """Copy every named torch layer's parameters into the Keras layer of the same name."""

    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    for name, module in source.named_modules():
        if isinstance(module, nn.Conv2d):
            target.get_layer(name).set_weights([numpy(module.weight.permute(2, 3, 1, 0)), numpy(module.bias)])
        elif isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            target.get_layer(name).set_weights(
                [
                    numpy(module.weight),
                    numpy(module.bias),
                    numpy(module.running_mean),
                    numpy(module.running_var),
                ]
            )
        elif isinstance(module, nn.Linear):
            target.get_layer(name).set_weights([numpy(module.weight.T), numpy(module.bias)])
    return target


TWINS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], tuple[int, ...]]] = {
    "resnet": (TorchResNet, keras_resnet, (3, 12, 12)),
    "plain": (TorchPlain, keras_plain, (2, 11, 11)),
}


def twin(name: str, seed: int = 0) -> tuple[nn.Module, Any, tuple[int, ...]]:
    """(PyTorch net, its Keras twin, one sample's channel-first shape)."""
    build_torch, build_keras, shape = TWINS[name]
    torch_model = randomize(build_torch(), seed)
    return torch_model, copy_weights(torch_model, build_keras()), shape


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A channel-first torch tensor as a channels-last array."""
    return t.detach().movedim(1, -1).numpy() if t.dim() >= 3 else t.detach().numpy()


def to_keras_input(x: torch.Tensor) -> Any:
    import tensorflow as tf

    return tf.constant(nhwc(x))
