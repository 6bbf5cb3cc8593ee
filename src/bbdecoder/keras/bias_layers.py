"""Which Keras layers carry a bias for FullGrad, what that bias is *now*, and along which axis.

Biases are read at every call, never cached: weights change while training.
"""

from __future__ import annotations

from typing import Any

from bbdecoder.keras._backend import keras, tf

_CONV_TYPES: tuple[type, ...] = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    )
    if hasattr(keras.layers, name)
)  # fmt: skip
BIAS_LAYER_TYPES: tuple[type, ...] = (*_CONV_TYPES, keras.layers.Dense, keras.layers.BatchNormalization)
"""Conv (1/2/3-D, transposed, depthwise, separable), Dense and BatchNormalization, by ``isinstance``."""


def is_bias_layer(layer: Any) -> bool:
    return isinstance(layer, BIAS_LAYER_TYPES)


def channel_axis(layer: Any, rank: int) -> int:
    """The (non-negative) axis of an output of ``rank`` dims that the layer's bias runs along."""
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = int(layer.axis)
    elif isinstance(layer, _CONV_TYPES) and getattr(layer, "data_format", None) == "channels_first":
        axis = 1
    else:
        axis = -1
    return axis % rank


def effective_bias(layer: Any, dtype: Any) -> Any:
    """The constant the layer adds per channel (1-D tf.Tensor in ``dtype``), or ``None`` if it adds none.

    BatchNormalization in inference mode is ``gamma * (x - mean) / sqrt(var + eps) + beta``, whose
    constant is ``beta - mean * gamma / sqrt(var + eps)`` (``gamma`` = 1 without ``scale``, ``beta`` = 0
    without ``center``).
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        mean = tf.cast(layer.moving_mean, dtype)
        scale = tf.math.rsqrt(tf.cast(layer.moving_variance, dtype) + tf.cast(layer.epsilon, dtype))
        if layer.scale:
            scale = scale * tf.cast(layer.gamma, dtype)
        bias = -mean * scale
        if layer.center:
            bias = bias + tf.cast(layer.beta, dtype)
        return tf.stop_gradient(bias)
    own_bias = getattr(layer, "bias", None)
    if own_bias is None:
        return None
    return tf.stop_gradient(tf.cast(own_bias, dtype))


def broadcast_bias(bias: Any, axis: int, rank: int) -> Any:
    """``bias`` reshaped to broadcast against an output of ``rank`` dims along ``axis``."""
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(bias, shape)


__all__ = ["BIAS_LAYER_TYPES", "broadcast_bias", "channel_axis", "effective_bias", "is_bias_layer"]
