"""The registry builds the Keras port's class for ``framework="keras"`` (its methods' maps channels last)."""

from __future__ import annotations

import numpy as np
import pytest

from bbdecoder import get_method, list_methods

pytest.importorskip("tensorflow")

FAST = {"ig": {"n_steps": 4}, "smoothgrad": {"n_samples": 2}}


@pytest.mark.parametrize("name", [spec.name for spec in list_methods("keras")])
def test_keras_methods_bind_through_the_registry(name: str) -> None:
    from bbdecoder.keras import keras, tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    x = tf.constant(np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32))
    spec = get_method(name)
    bound = spec.bind(model, framework="keras", **FAST.get(name, {}))
    assert type(bound.explainer) is spec.load("keras")
    maps = np.asarray(bound(x, [0, 2]))
    assert maps.shape == (2, 8, 8, 1) and np.isfinite(maps).all()
    if not spec.signed:
        assert (maps >= 0).all()
    else:  # the signed map is the attribution summed over the (last) channel axis
        attribution = np.asarray(bound.explainer.attribute(x, [0, 2], **bound.call_options))
        np.testing.assert_allclose(maps[..., 0], attribution.sum(axis=-1), rtol=1e-6, atol=1e-7)


def test_a_method_without_a_keras_port_says_so() -> None:
    with pytest.raises(
        ValueError, match=r"'attention_rollout' is not available for 'keras' \(available: torch\)"
    ):
        get_method("attention_rollout").load("keras")
