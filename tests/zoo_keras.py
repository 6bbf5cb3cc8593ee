"""Keras twins of the PyTorch zoo (:mod:`tests.zoo`), with the PyTorch weights copied.

Every twin ``twin(name, torch_model)`` is a functional Keras model that computes the same function
on channels-last inputs ``(N, 16, 16, 3)``: each Conv/BatchNorm/Linear of the PyTorch model has a
Keras layer named after its qualified name (dots as underscores) and :func:`copy_weights` copies
by that name:

* conv kernels ``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``; a PyTorch ``padding=1`` conv of stride 2
  is ``ZeroPadding2D(1)`` + a ``"valid"`` conv (Keras' ``"same"`` pads only after for even sizes);
* BatchNorm with ``epsilon=1e-5`` (PyTorch's), its running statistics and affine parameters;
* a Linear after ``Flatten`` has its input dim permuted from ``(C, H, W)`` to ``(H, W, C)`` order;
* timm's ``BatchNormAct2d`` is a ``BatchNormalization`` followed by a ``ReLU``;
* ``softmax_head`` ends in ``Dense(4, activation="softmax")`` (``keras.applications``' head),
  ``softmax_layer`` in a separate ``Softmax`` layer; ``model_output`` returns a dict
  ``{"logits", "hidden_states"}``.

``float64=True`` builds every layer in float64 (for comparisons to 1e-10).
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

from .zoo import INPUT_SHAPE, NUM_CLASSES, WIDTH

L = keras.layers
SPATIAL = INPUT_SHAPE[1:]
KERAS_INPUT_SHAPE = (*SPATIAL, INPUT_SHAPE[0])


class _Builder:
    """Layers of one dtype, named after the PyTorch modules they twin."""

    def __init__(self, float64: bool) -> None:
        self.dtype = "float64" if float64 else "float32"

    def conv(
        self, name: str, filters: int, kernel: int, stride: int = 1, bias: bool = True
    ) -> Callable[[Any], Any]:
        conv = L.Conv2D(
            filters,
            kernel,
            stride,
            padding="same" if stride == 1 else "valid",
            use_bias=bias,
            name=name,
            dtype=self.dtype,
        )
        if stride == 1 or kernel == 1:
            return conv
        pad = L.ZeroPadding2D(kernel // 2, dtype=self.dtype)
        return lambda h: conv(pad(h))

    def bn(self, name: str) -> Any:
        return L.BatchNormalization(epsilon=1e-5, name=name, dtype=self.dtype)

    def relu(self) -> Any:
        return L.ReLU(dtype=self.dtype)

    def dense(self, name: str, units: int, activation: str | None = None) -> Any:
        return L.Dense(units, activation=activation, name=name, dtype=self.dtype)

    def input(self) -> Any:
        return keras.Input(KERAS_INPUT_SHAPE, dtype=self.dtype)


def _plain(b: _Builder, h: Any, prefix: str = "", head_activation: str | None = None) -> Any:
    h = L.MaxPooling2D(2, dtype=b.dtype)(b.relu()(b.bn(f"{prefix}1")(b.conv(f"{prefix}0", WIDTH, 3)(h))))
    h = b.relu()(b.bn(f"{prefix}5")(b.conv(f"{prefix}4", 2 * WIDTH, 3)(h)))
    h = L.Flatten(dtype=b.dtype)(L.MaxPooling2D(2, dtype=b.dtype)(h))
    return b.dense(f"{prefix}9", NUM_CLASSES, head_activation)(h)


def _block(b: _Builder, h: Any, name: str, cout: int, stride: int, shortcut: bool) -> Any:
    out = b.relu()(b.bn(f"{name}_bn1")(b.conv(f"{name}_conv1", cout, 3, stride, bias=False)(h)))
    out = b.bn(f"{name}_bn2")(b.conv(f"{name}_conv2", cout, 3, bias=False)(out))
    if shortcut:
        h = b.bn(f"{name}_shortcut_1")(b.conv(f"{name}_shortcut_0", cout, 1, stride, bias=False)(h))
    return b.relu()(L.Add(dtype=b.dtype)([out, h]))


def _linear_head(b: _Builder, h: Any, name: str) -> Any:
    return b.dense(name, NUM_CLASSES)(L.GlobalAveragePooling2D(dtype=b.dtype)(h))


def plain_cnn(b: _Builder) -> Any:
    inputs = b.input()
    return keras.Model(inputs, _plain(b, inputs), name="plain_cnn")


def softmax_head(b: _Builder) -> Any:
    """``keras.applications``' pattern: the last Dense carries ``activation="softmax"``."""
    inputs = b.input()
    return keras.Model(inputs, _plain(b, inputs, head_activation="softmax"), name="softmax_head")


def softmax_layer(b: _Builder) -> Any:
    """The softmax as its own layer after the logits (``softmax_head``'s weights)."""
    inputs = b.input()
    return keras.Model(inputs, L.Softmax(dtype=b.dtype)(_plain(b, inputs)), name="softmax_layer")


def model_output(b: _Builder) -> Any:
    inputs = b.input()
    logits = _plain(b, inputs, prefix="net_")
    hidden = L.Lambda(lambda x: keras.ops.mean(x, axis=(1, 2, 3)), dtype=b.dtype)(inputs)
    return keras.Model(inputs, {"logits": logits, "hidden_states": hidden}, name="model_output")


def fused_bn_act(b: _Builder) -> Any:
    inputs = b.input()
    h = b.relu()(b.bn("1")(b.conv("0", WIDTH, 3)(inputs)))
    h = b.relu()(b.bn("3")(b.conv("2", WIDTH, 3, stride=2)(h)))
    return keras.Model(inputs, _linear_head(b, h, "4_fc"), name="fused_bn_act")


def residual_net(b: _Builder) -> Any:
    inputs = b.input()
    h = b.relu()(b.bn("bn")(b.conv("stem", WIDTH, 3, bias=False)(inputs)))
    h = _block(b, h, "layer1", WIDTH, 1, shortcut=False)
    h = _block(b, h, "layer2", 2 * WIDTH, 2, shortcut=True)
    return keras.Model(inputs, _linear_head(b, h, "fc"), name="residual_net")


def linear_head(b: _Builder) -> Any:
    inputs = b.input()
    h = b.relu()(b.conv("0_0", WIDTH, 3)(inputs))
    h = b.relu()(b.conv("0_2", WIDTH, 3, stride=2)(h))
    return keras.Model(inputs, _linear_head(b, h, "1_fc"), name="linear_head")


TWINS: dict[str, Callable[[_Builder], Any]] = {
    "plain_cnn": plain_cnn,
    "fused_bn_act": fused_bn_act,
    "residual_net": residual_net,
    "softmax_head": softmax_head,
    "model_output": model_output,
    "linear_head": linear_head,
}
"""Zoo name -> Keras twin builder (``softmax_layer`` is a second twin of ``softmax_head``)."""

FLATTENED: dict[str, tuple[int, int, int]] = {"9": (2 * WIDTH, 4, 4), "net.9": (2 * WIDTH, 4, 4)}
"""Linear layers fed by ``Flatten``, and the ``(C, H, W)`` they flatten (their input dims are permuted)."""


def twin(name: str, torch_model: nn.Module, *, float64: bool = False, variant: str | None = None) -> Any:
    """The Keras twin of the zoo model ``name`` with ``torch_model``'s weights (``variant``: another
    builder of :data:`TWINS` or ``"softmax_layer"``, for the same weights)."""
    builders = {**TWINS, "softmax_layer": softmax_layer}
    model = builders[variant or name](_Builder(float64))
    copy_weights(torch_model, model)
    return model


def copy_weights(source: nn.Module, target: Any) -> None:
    """Every Conv2d/BatchNorm2d/Linear of ``source`` into the Keras layer of the same name."""

    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    copied = 0
    for name, module in source.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            continue
        layer = target.get_layer(name.replace(".", "_"))
        if isinstance(module, nn.Conv2d):
            weights = [numpy(module.weight.permute(2, 3, 1, 0))]
            weights += [numpy(module.bias)] if module.bias is not None else []
        elif isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            weights = [
                numpy(module.weight),
                numpy(module.bias),
                numpy(module.running_mean),
                numpy(module.running_var),
            ]
        else:
            kernel = module.weight.detach()
            if name in FLATTENED:
                c, h, w = FLATTENED[name]
                kernel = kernel.reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(kernel.shape[0], -1)
            weights = [numpy(kernel.t()), numpy(module.bias)]
        layer.set_weights([w.astype(layer.dtype) for w in weights])
        copied += 1
    with_weights = [layer for layer in target.layers if layer.weights]
    assert copied == len(with_weights), (
        f"copied {copied} layers into {len(with_weights)} Keras layers with weights"
    )


def nhwc(x: torch.Tensor) -> np.ndarray:
    """A channel-first batch as a channels-last NumPy array."""
    return np.ascontiguousarray(x.detach().movedim(1, -1).numpy())
