"""SmoothGrad (Smilkov et al. 2017) and its variants, around any explainer.

The attribution (or saliency) of ``n_samples`` noisy copies ``x + N(0, sigma^2)`` is averaged, with
``sigma = noise_level * (max(x) - min(x))`` taken per sample. ``smoothgrad_sq`` averages squares and
``vargrad`` (Adebayo et al. 2018) takes the population variance across the copies. The same seed gives
every sample the same noise draws, so a batch equals its samples one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import copy as shallow_copy
from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer
from bbdecoder.attribution.gradient import Gradient
from bbdecoder.attribution.keywords import forwards_keywords
from bbdecoder.attribution.layer_attribution import LayerSpec, layer_smoothgrad, resolve_layer, uses_layer
from bbdecoder.targets import PerSampleTargets, TargetLike
from bbdecoder.validation import check_smoothgrad_settings

ExplainFn = Callable[..., Any]


class SmoothGrad(Explainer):
    """Average an explainer's result over noisy copies of the input.

    Args:
        explainer_or_model: any :class:`Explainer` (``IntegratedGradients``, ``InputXGradient``,
            ``FullGrad``, ...); a bare ``nn.Module`` is wrapped in :class:`Gradient`.
        n_samples: noisy copies per input.
        noise_level: noise standard deviation as a fraction of each sample's value range (max - min).
        kind: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"``
            (population variance across the copies).
        seed: seeds a ``torch.Generator`` on the inputs' device. Copy ``k`` of every sample uses the
            same standard normal draw ``(1, *sample_shape)`` (times that sample's ``sigma``): the same
            seed gives every sample the same noise draws, so a batch equals its samples one by one
            (and the same seed gives the same maps). Each sample's copies are still independent
            draws, so its estimate is the usual SmoothGrad mean; only the samples of one batch share
            their draws.
        internal_batch_size: most rows (copies x N) per call of the inner explainer; at least one
            copy per call. Default: as many copies as the memory budget allows (estimated with one
            no-grad probe forward), or one copy at a time when the inner explainer does not run the
            model in eval mode (train-mode BatchNorm would mix the copies).
        layer: add the noise at this layer's output and attribute there (embedding space for token
            models: ``attribute`` gives ``(N, L, D)``, ``token_scores`` ``(N, L)``, padding exactly 0).
            With a bare model it is ``Gradient(model, layer=layer)``; with an explainer, a copy of it
            at that layer (the explainer passed in is not changed). Token ids and dict inputs default
            to the inner explainer's layer, else the input embeddings. The noise's ``sigma`` is
            ``noise_level`` times each sample's range of the layer's output.

    The target is frozen on the clean input first, so ``None`` means the clean arg-max class for every
    noisy copy. Copies are concatenated along the batch dimension; tensors passed through ``kwargs``
    to the inner explainer therefore have to broadcast over a batch of ``copies x N`` rows (or use
    ``internal_batch_size=N`` for one copy per call).
    """

    def __init__(
        self,
        explainer_or_model: Explainer | nn.Module,
        n_samples: int = 25,
        noise_level: float = 0.15,
        kind: str = "smoothgrad",
        seed: int = 0,
        internal_batch_size: int | None = None,
        *,
        layer: LayerSpec = None,
    ) -> None:
        inner = self._inner(explainer_or_model, layer)
        super().__init__(
            inner.model,
            input_transform=inner.input_transform,
            eval_mode=getattr(inner, "eval_mode", True),
            scores_from=getattr(inner, "scores_from", "logits"),
            layer=getattr(inner, "attribution_layer", None),
        )
        check_smoothgrad_settings(n_samples, noise_level, kind, internal_batch_size)
        self.explainer = inner
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        self.kind = kind
        self.seed = seed
        self.internal_batch_size = internal_batch_size

    @forwards_keywords(lambda self: self.explainer.attribute)
    def attribute(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """The inner explainer's ``attribute`` reduced over noisy copies; shaped like ``inputs``.

        ``kwargs`` go to the inner ``attribute`` (e.g. ``n_steps`` for Integrated Gradients).
        """
        return self._smooth(self.explainer.attribute, inputs, target, kwargs)

    @forwards_keywords(lambda self: self.explainer.saliency)
    def saliency(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """The inner explainer's ``saliency`` reduced over noisy copies; ``(N, 1, *spatial)``."""
        return self._smooth(self.explainer.saliency, inputs, target, kwargs)

    def noisy_copies(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """All ``n_samples`` noisy copies, in the order they are drawn (for inspection and tests); each
        is shaped like ``inputs``, copy ``k`` being ``inputs + sigma * z_k`` with one ``z_k`` of shape
        ``(1, *sample_shape)`` for every sample."""
        backend = self.backend
        draw = self._noise_source(backend.prepare(inputs))
        return [backend.to_framework(draw()) for _ in range(self.n_samples)]

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _inner(explainer_or_model: Any, layer: LayerSpec = None) -> Any:
        """The explainer to smooth (the Keras front end accepts Keras explainers and models)."""
        if isinstance(explainer_or_model, Explainer):
            return explainer_or_model if layer is None else _at_layer(explainer_or_model, layer)
        if isinstance(explainer_or_model, nn.Module):
            return Gradient(explainer_or_model, layer=layer)
        raise TypeError(
            f"SmoothGrad wraps an Explainer or an nn.Module, got {type(explainer_or_model).__name__}"
        )

    def _noise_source(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Draws the next noisy copy of the whole batch: one standard normal ``(1, *sample_shape)``
        per copy, shared by every sample and scaled by each sample's ``sigma``."""
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        flat = x.reshape(x.shape[0], -1)
        value_range = flat.max(dim=1).values - flat.min(dim=1).values
        sigma = (self.noise_level * value_range).view((-1,) + (1,) * (x.dim() - 1))
        # One draw per copy for one sample, broadcast over the batch: sample i's noise does not depend
        # on its position or on the batch size, so a batch equals its samples explained one by one.
        shape = (1, *x.shape[1:])

        def draw() -> torch.Tensor:
            with torch.no_grad():
                noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
                return x + sigma * noise

        return draw

    def _smooth(
        self, explain: ExplainFn, inputs: torch.Tensor, target: TargetLike, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        if uses_layer(self.explainer, inputs):
            return layer_smoothgrad(self, explain, inputs, target, kwargs)
        backend = self.backend
        x = backend.prepare(inputs)
        n = x.shape[0]
        with backend.session(), torch.no_grad():
            frozen = backend.freeze(x, backend.user_target(target))
        draw = self._noise_source(x)
        copies_per_call = self._copies_per_call(x)
        reduction = _Reduction(self.kind)
        done = 0
        while done < self.n_samples:
            copies = min(copies_per_call, self.n_samples - done)
            noisy = torch.cat([draw() for _ in range(copies)])
            row_target = backend.target_to_framework(_repeat_target(frozen, copies))
            result = explain(backend.to_framework(noisy), row_target, **kwargs)
            if isinstance(result, (tuple, list, dict)):
                raise TypeError(
                    f"SmoothGrad needs one tensor from the inner explainer, got {type(result).__name__}; "
                    "do not pass return_convergence_delta=True through SmoothGrad"
                )
            for copy in backend.from_framework(result).detach().split(n):
                reduction.add(copy)
            done += copies
        return backend.to_framework(reduction.result())

    def _copies_per_call(self, x: torch.Tensor) -> int:
        n = x.shape[0]
        if not getattr(self.explainer, "eval_mode", True):
            return 1
        if self.internal_batch_size is not None:
            rows = self.internal_batch_size
        else:
            with self.backend.session():
                rows = self.backend.rows_for_budget(x)
        return max(1, min(self.n_samples, rows // n))


def _at_layer(explainer: Explainer, layer: LayerSpec) -> Explainer:
    """A shallow copy of ``explainer`` attributing at ``layer`` (refused when it has another layer)."""
    own = getattr(explainer, "attribution_layer", None)
    _, wanted = resolve_layer(explainer.model, layer)
    if own is not None and resolve_layer(explainer.model, own)[1] is not wanted:
        raise ValueError(
            f"SmoothGrad(layer={layer!r}) wraps a {type(explainer).__name__} at another layer ({own!r}); "
            "give the layer once, to SmoothGrad or to the inner explainer"
        )
    moved = shallow_copy(explainer)
    moved.attribution_layer = layer
    return moved


def _repeat_target(target: TargetLike, copies: int) -> TargetLike:
    """A per-sample class tensor repeated for ``copies`` concatenated copies; others apply to every row."""
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        return target.repeat(copies)
    if isinstance(target, PerSampleTargets):
        return target.repeat(copies)
    return target


class _Reduction:
    """Streaming mean, mean of squares or population variance (Welford), in a fixed order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.count = 0
        self.total: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, value: torch.Tensor) -> None:
        self.count += 1
        if self.kind == "vargrad":
            if self.mean is None or self.m2 is None:
                self.mean, self.m2 = value.clone(), torch.zeros_like(value)
                return
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)
            return
        term = value * value if self.kind == "smoothgrad_sq" else value
        self.total = term.clone() if self.total is None else self.total + term

    def result(self) -> torch.Tensor:
        if self.kind == "vargrad":
            assert self.m2 is not None
            return self.m2 / self.count
        assert self.total is not None
        return self.total / self.count
