"""The Keras front end of the shared methods: the same classes, on the Keras backend.

``bbdecoder.keras.IntegratedGradients`` *is* :class:`bbdecoder.IntegratedGradients` (a subclass
that only swaps the backend, :class:`~bbdecoder.backends.keras_core.KerasBackend`; see
:mod:`bbdecoder.keras.methods`): one algorithm, one set of numbers. What differs is only at the boundary:

* inputs are channels-last ``(N, *spatial, C)`` ``tf.Tensor`` or NumPy arrays (float32/float64);
  results are channels-last ``tf.Tensor`` (maps ``(N, *spatial, 1)``, per-sample values ``(N,)``);
* targets: ``None``, an int, one class per sample (list, array, ``tf.Tensor``), or a callable that
  receives the Keras model's output (``tf`` tensors) and returns one score per row ``(rows,)``;
* the model runs with ``training=False``; ``eval_mode=False`` is refused (there is no train-mode
  explanation on Keras), and so is ``layer=`` (layer attribution is PyTorch-only);
* ``scores_from="logits"`` (default) explains the logits beneath a final softmax/sigmoid; see
  :mod:`bbdecoder.backends.keras_core`;
* keywords follow the Keras conventions: no ``additional_forward_args`` (wrap the model instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bbdecoder.keras.layers import check_model

if TYPE_CHECKING:
    from bbdecoder.backends.keras_core import KerasBackend


class KerasMethod:
    """Mixin placed before a shared method class: the Keras backend and the Keras conventions."""

    _torch_conventions = False
    model: Any
    input_transform: Any
    scores_from: str
    eval_mode: bool

    def _check_model(self, model: Any) -> Any:
        return check_model(model)

    def _check_layer(self, layer: Any) -> None:
        raise NotImplementedError(
            f"layer= is PyTorch-only: the Keras {type(self).__name__} attributes at the input; for maps at "
            "a layer use bbdecoder.keras.GradCAM(model, layer=...)"
        )

    def _make_backend(self) -> KerasBackend:
        from bbdecoder.backends.keras_core import KerasBackend  # imports bbdecoder.keras first

        if not self.eval_mode:
            raise ValueError(
                "eval_mode=False is not supported on Keras: the model always runs with training=False"
            )
        return KerasBackend(self.model, input_transform=self.input_transform, scores_from=self.scores_from)

    def session(self) -> Any:
        return self.backend.session()  # type: ignore[attr-defined]

    def forward(self, inputs: Any, samples: Any = None) -> Any:
        """The Keras model's output for channels-last ``inputs`` (the head looked through)."""
        return self.backend.output(inputs)  # type: ignore[attr-defined]


__all__ = ["KerasMethod"]
