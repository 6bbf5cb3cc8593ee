"""The Keras backend: layout at the boundary, the shared memory rule, streaming SmoothGrad."""

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

import bbdecoder.keras as bk  # noqa: E402
from bbdecoder.attribution.memory import GRAD_MEMORY_FACTOR, rows_from_bytes  # noqa: E402
from bbdecoder.backends.keras_core import KerasBackend  # noqa: E402

L = keras.layers


@pytest.fixture(scope="module")
def linear() -> Any:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4, 4, 2)), L.Flatten(), L.Dense(5)])


def test_layout_round_trip_and_arrays(linear: Any) -> None:
    backend = KerasBackend(linear)
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype("float64")
    prepared = backend.prepare(x)
    assert prepared.shape == (3, 2, 4, 4) and prepared.dtype == torch.float64
    np.testing.assert_array_equal(prepared.permute(0, 2, 3, 1).numpy(), x)
    back = backend.to_framework(prepared)
    assert isinstance(back, tf.Tensor) and back.dtype == tf.float64
    np.testing.assert_array_equal(back.numpy(), x)
    np.testing.assert_array_equal(backend.from_framework(back).numpy(), prepared.numpy())
    # Baselines and masks given channels last come out channel-first, ready to broadcast.
    assert backend.user_array(np.zeros((1, 4, 4, 1)), 4).shape == (1, 1, 4, 4)
    assert backend.user_array(np.zeros((4, 4, 2)), 4).shape == (1, 2, 4, 4)
    assert backend.user_array(np.arange(2.0), 4).shape == (1, 2, 1, 1)
    assert backend.user_array(np.zeros((4, 4)), 4).shape == (4, 4)
    assert backend.user_shape((2, 3, 2), 4) == (2, 2, 3)
    assert backend.user_shape((2, 3), 4) == (2, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        backend.prepare(np.full((1, 4, 4, 2), np.nan))
    with pytest.raises(TypeError, match=r"tf\.Tensor or a NumPy array"):
        backend.prepare(torch.zeros(1, 4, 4, 2))


def test_the_memory_rule_is_the_pytorch_rule(linear: Any) -> None:
    backend = KerasBackend(linear)
    x = backend.prepare(np.zeros((2, 4, 4, 2), dtype="float32"))
    per_row = backend.activation_bytes_per_row(x)
    assert per_row == (32 + 32 + 5) * 4  # input, Flatten's output, Dense's output; float32
    budget = int(per_row * GRAD_MEMORY_FACTOR * 10)
    assert backend.rows_for_budget(x, budget) == 10 == rows_from_bytes(per_row, budget, cpu=True)


class _Spy(bk.InputXGradient):
    """Records the rows of every call (the noisy copies SmoothGrad hands over at once)."""

    calls: list[int]

    def attribute(self, inputs: Any, target: Any = None, **kwargs: Any) -> Any:
        self.calls.append(int(inputs.shape[0]))
        return super().attribute(inputs, target, **kwargs)


def test_smoothgrad_streams_copies_in_budgeted_calls(linear: Any) -> None:
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 2)).astype("float32")
    spy = _Spy(linear)
    spy.calls = []
    smooth = bk.SmoothGrad(spy, n_samples=5, internal_batch_size=4, seed=3)
    got = smooth.attribute(x, [0, 4]).numpy()
    assert spy.calls == [4, 4, 2]  # two copies of two samples per call, then the last copy
    expected = np.mean(
        [bk.InputXGradient(linear).attribute(c, [0, 4]).numpy() for c in smooth.noisy_copies(x)], 0
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # Default: as many copies per call as the shared memory rule allows.
    spy.calls = []
    bk.SmoothGrad(spy, n_samples=5).attribute(x, 1)
    per_row = KerasBackend(linear).activation_bytes_per_row(torch.zeros(1, 2, 4, 4))
    rows = rows_from_bytes(per_row, 1024 * 2**20, cpu=True)
    assert spy.calls == [2 * min(5, rows // 2)] * (5 // min(5, rows // 2))


def test_keras_refuses_layer_and_train_mode(linear: Any) -> None:
    with pytest.raises(NotImplementedError, match="PyTorch-only"):
        bk.Gradient(linear, layer="dense")
    with pytest.raises(ValueError, match="training=False"):
        bk.IntegratedGradients(linear, eval_mode=False)
    with pytest.raises(TypeError, match="Keras 3 model"):
        bk.Occlusion(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Keras explainer or a Keras model"):
        bk.SmoothGrad(torch.nn.Linear(2, 2))


def test_smoothgrad_wraps_the_keras_fullgrad() -> None:
    """SmoothFullGrad on Keras: the shared SmoothGrad around the Keras FullGrad (another explainer type)."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(2).uniform(size=(2, 6, 6, 2)).astype("float32")
    fullgrad = bk.FullGrad(model, im_size=(6, 6, 2))
    smooth = bk.SmoothGrad(fullgrad, n_samples=3, seed=5)
    got = smooth.saliency(x, [0, 2]).numpy()
    expected = np.mean([fullgrad.saliency(c, [0, 2]).numpy() for c in smooth.noisy_copies(x)], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (2, 6, 6, 1)
