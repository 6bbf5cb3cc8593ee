"""SmoothFullGrad: FullGrad's saliency averaged over noisy copies of the input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from bbdecoder.attribution.base import InputTransform
from bbdecoder.attribution.fullgrad import FullGrad
from bbdecoder.attribution.smoothgrad import SmoothGrad


class SmoothFullGrad(SmoothGrad):
    """``SmoothGrad`` over :class:`FullGrad`'s saliency (the reference's "smooth" variant).

    ``saliency(inputs, target) -> (N, 1, *spatial)``: the mean of FullGrad maps of ``n_samples`` noisy
    copies (noise sigma = ``noise_level`` x each sample's value range). Completeness is checked once,
    on the clean model, as FullGrad does. The noise is :class:`SmoothGrad`'s: the same seed gives every
    sample the same noise draws, so a batch equals its samples one by one.
    """

    fullgrad_class: ClassVar[type[FullGrad]] = FullGrad
    """The FullGrad smoothed (the Keras front end puts its own here)."""

    def __init__(
        self,
        model: Any,
        im_size: Sequence[int] | None = None,
        *,
        n_samples: int = 25,
        noise_level: float = 0.15,
        seed: int = 0,
        input_transform: InputTransform | None = None,
        internal_batch_size: int | None = None,
        check: bool = True,
    ) -> None:
        fullgrad = self.fullgrad_class(model, im_size, input_transform=input_transform, check=check)
        super().__init__(
            fullgrad,
            n_samples=n_samples,
            noise_level=noise_level,
            seed=seed,
            internal_batch_size=internal_batch_size,
        )
        self.fullgrad = fullgrad
