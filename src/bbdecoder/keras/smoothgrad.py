"""SmoothGrad (Smilkov et al. 2017) and its variants around any Keras explainer.

Noise is drawn exactly as on the PyTorch side (a seeded ``torch.Generator``, channels-first draw order),
so the same seed gives the same noisy copies, transposed, in both frameworks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bbdecoder.attribution.keywords import forwards_keywords
from bbdecoder.keras._backend import tf
from bbdecoder.keras.base import KerasExplainer, check_inputs
from bbdecoder.keras.gradient import Gradient
from bbdecoder.keras.integrated_gradients import DEFAULT_BUDGET_BYTES, rows_for_budget
from bbdecoder.keras.layers import check_model
from bbdecoder.keras.targets import KerasTargetLike
from bbdecoder.validation import check_smoothgrad_settings

ExplainFn = Callable[..., Any]


class SmoothGrad(KerasExplainer):
    """Average a Keras explainer's result over noisy copies of the input.

    Args:
        explainer_or_model: any Keras explainer of this package (``IntegratedGradients``, ``FullGrad``,
            ...); a bare Keras model is wrapped in :class:`~bbdecoder.keras.Gradient`.
        n_samples: noisy copies per input.
        noise_level: noise standard deviation as a fraction of each sample's value range (max - min).
        kind: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"``
            (population variance across the copies).
        seed: seeds the noise; the same seed gives the same noise as PyTorch's ``SmoothGrad``.
        internal_batch_size: most rows (copies x N) per call of the inner explainer; at least one copy.

    The target is frozen on the clean input first, so ``None`` means the clean arg-max class for every
    noisy copy.
    """

    def __init__(
        self,
        explainer_or_model: Any,
        n_samples: int = 25,
        noise_level: float = 0.15,
        kind: str = "smoothgrad",
        seed: int = 0,
        internal_batch_size: int | None = None,
    ) -> None:
        inner = explainer_or_model
        if not isinstance(inner, KerasExplainer):
            inner = Gradient(check_model(explainer_or_model))
        super().__init__(inner.model, input_transform=inner.input_transform)
        check_smoothgrad_settings(n_samples, noise_level, kind, internal_batch_size)
        self.explainer = inner
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        self.kind = kind
        self.seed = seed
        self.internal_batch_size = internal_batch_size

    @forwards_keywords(lambda self: self.explainer.attribute)
    def attribute(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """The inner ``attribute`` reduced over noisy copies; a tf.Tensor shaped like ``inputs``."""
        return self._smooth(self.explainer.attribute, inputs, target, kwargs)

    @forwards_keywords(lambda self: self.explainer.saliency)
    def saliency(self, inputs: Any, target: KerasTargetLike = None, **kwargs: Any) -> Any:
        """The inner ``saliency`` reduced over noisy copies; a tf.Tensor (N, *spatial, 1)."""
        return self._smooth(self.explainer.saliency, inputs, target, kwargs)

    def noisy_copies(self, inputs: Any) -> list[Any]:
        """All ``n_samples`` noisy copies (tf.Tensors), in the order they are drawn."""
        draw = self._noise_source(check_inputs(inputs))
        return [draw() for _ in range(self.n_samples)]

    # -- internals --------------------------------------------------------------------------------
    def _noise_source(self, x: Any) -> Callable[[], Any]:
        array = x.numpy()
        generator = torch.Generator().manual_seed(self.seed)
        flat = array.reshape(array.shape[0], -1)
        value_range = flat.max(axis=1) - flat.min(axis=1)
        sigma = (self.noise_level * value_range).reshape((-1,) + (1,) * (array.ndim - 1))
        spatial = array.ndim >= 3
        draw_shape = (array.shape[0], array.shape[-1], *array.shape[1:-1]) if spatial else array.shape
        torch_dtype = torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype

        def draw() -> Any:
            noise = torch.randn(draw_shape, generator=generator, dtype=torch_dtype).numpy()
            if spatial:
                noise = np.moveaxis(noise, 1, -1)
            return tf.constant(array + sigma.astype(array.dtype) * noise)

        return draw

    def _smooth(
        self, explain: ExplainFn, inputs: Any, target: KerasTargetLike, kwargs: dict[str, Any]
    ) -> Any:
        x = check_inputs(inputs)
        frozen = self.explainer.freeze_target(x, target)
        draw = self._noise_source(x)
        copies_per_call = self._copies_per_call(x)
        results: list[np.ndarray] = []
        done = 0
        while done < self.n_samples:
            copies = min(copies_per_call, self.n_samples - done)
            noisy = tf.concat([draw() for _ in range(copies)], axis=0)
            result = explain(noisy, _repeat_target(frozen, copies), **kwargs)
            if not isinstance(result, tf.Tensor):
                raise TypeError(
                    f"SmoothGrad needs one tensor from the inner explainer, got {type(result).__name__}; "
                    "do not pass return_convergence_delta=True through SmoothGrad"
                )
            results.extend(np.split(result.numpy(), copies))
            done += copies
        stacked = np.stack(results)
        if self.kind == "vargrad":
            reduced = stacked.var(axis=0)
        elif self.kind == "smoothgrad_sq":
            reduced = (stacked * stacked).mean(axis=0)
        else:
            reduced = stacked.mean(axis=0)
        return tf.constant(reduced)

    def _copies_per_call(self, x: Any) -> int:
        n = int(x.shape[0])
        rows = self.internal_batch_size or rows_for_budget(self.explainer, x, DEFAULT_BUDGET_BYTES)
        return max(1, min(self.n_samples, rows // n))


def _repeat_target(target: KerasTargetLike, copies: int) -> KerasTargetLike:
    """A per-sample class tensor repeated for ``copies`` concatenated copies; others apply to every row."""
    if isinstance(target, tf.Tensor) and target.shape.rank == 1:
        return tf.tile(target, [copies])
    return target


__all__ = ["SmoothGrad"]
