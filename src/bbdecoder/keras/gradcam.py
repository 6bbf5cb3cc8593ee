"""Grad-CAM (Selvaraju et al. 2017) for Keras models with channels-last feature maps."""

from __future__ import annotations

from typing import Any

import numpy as np

from bbdecoder.keras._backend import tf
from bbdecoder.keras.base import KerasExplainer, KerasInputTransform, check_inputs
from bbdecoder.keras.layers import LayerCall, LayerSelector, find_layer, intercepted_calls, leaf_layers
from bbdecoder.keras.postprocess import minmax_per_sample, resize_to
from bbdecoder.keras.targets import KerasTargetLike


class GradCAM(KerasExplainer):
    """Grad-CAM on one layer: ``ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of dF/dA_c.

    Args:
        model: the Keras classifier (never modified).
        layer: the layer whose output A (N, *spatial, C) is used: a ``keras.layers.Layer`` of the model,
            a layer name, or an ID into :func:`bbdecoder.keras.layers.leaf_layers`. ``None`` picks the
            last leaf layer, in execution order, whose output has the input's number of dims and more
            than one spatial position (for an image CNN: the last feature map that is not 1x1).

    A layer that runs several times in one forward pass is read at its last call. ``saliency``
    upsamples the map bilinearly like an image resize (half-pixel centres, ``align_corners=False``) to
    the input's spatial size and min-max scales it per image to [0, 1]; ``layer_map`` gives the raw map.
    """

    def __init__(
        self,
        model: Any,
        layer: LayerSelector | None = None,
        *,
        input_transform: KerasInputTransform | None = None,
    ) -> None:
        super().__init__(model, input_transform=input_transform)
        self.layer: Any = find_layer(model, layer) if layer is not None else None

    def layer_map(self, inputs: Any, target: KerasTargetLike = None) -> Any:
        """The raw Grad-CAM map at the layer's resolution, a tf.Tensor (N, *layer_spatial, 1), >= 0."""
        x = check_inputs(inputs, min_dim=3)
        layer = self.layer if self.layer is not None else self._default_layer(x)
        activations: list[Any] = []
        tape = tf.GradientTape()

        def record(_layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            output = call(*args, **kwargs)
            if not isinstance(output, tf.Tensor):
                raise TypeError(f"Grad-CAM needs a layer with a tensor output, got {type(output).__name__}")
            tape.watch(output)
            activations.append(output)
            return output

        with tape, intercepted_calls([layer], record):
            tape.watch(x)
            scores, _ = self.scores(x, target)
            total = tf.reduce_sum(scores)
        if not activations:
            raise RuntimeError(f"the Grad-CAM layer {layer.name!r} did not run in the forward pass")
        # A layer that runs several times contributes its last call: the deepest map.
        activation = activations[-1]
        gradient = tape.gradient(total, activation, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        spatial_axes = list(range(1, activation.shape.rank - 1))
        weights = tf.reduce_mean(gradient, axis=spatial_axes, keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1, keepdims=True))

    def saliency(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """Grad-CAM map (N, *spatial, 1) at input resolution, min-max scaled to [0, 1] per image."""
        x = check_inputs(inputs, min_dim=3)
        cam = self.layer_map(x, target)
        spatial = tuple(int(s) for s in x.shape[1:-1])
        return minmax_per_sample(resize_to(cam, spatial, align_corners=False))

    def _default_layer(self, inputs: Any) -> Any:
        candidates: list[Any] = []
        rank = inputs.shape.rank

        def record(layer: Any, call: LayerCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            output = call(*args, **kwargs)
            if (
                isinstance(output, tf.Tensor)
                and output.shape.rank == rank
                and int(np.prod(output.shape[1:-1])) > 1
            ):
                candidates.append(layer)
            return output

        with intercepted_calls(leaf_layers(self.model), record):
            self.forward(inputs[:1])
        if not candidates:
            raise ValueError(
                "found no layer with a spatial output for Grad-CAM; pass `layer=` (a layer, name or ID)"
            )
        self.layer = candidates[-1]
        return self.layer


__all__ = ["GradCAM"]
