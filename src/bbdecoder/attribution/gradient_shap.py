"""GradientSHAP (Lundberg & Lee 2017; Captum's ``GradientShap``): expected gradients over baselines.

For each sample, ``n_samples`` draws of a baseline ``b`` (uniformly from the given set), a point
``alpha ~ U(0, 1)`` and Gaussian input noise ``eps ~ N(0, stdevs^2)``; the attribution is the mean of
``(x + eps - b) * dF/dx (b + alpha (x + eps - b))``. With ``stdevs=0`` its expectation is the mean over
baselines of Integrated Gradients with that baseline. Draws come from a seeded ``torch.Generator``:
draw ``j`` (its baseline index, ``alpha`` and one noise ``(1, *sample_shape)``) is the same for every
sample, so the same seed gives every sample the same draws and a batch equals its samples one by one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import Explainer, InputTransform
from bbdecoder.attribution.baselines import BaselineSpec, make_baseline
from bbdecoder.attribution.integrated_gradients import _per_sample_target, _rows_of
from bbdecoder.attribution.layer_attribution import LayerSpec, layer_gradient_shap, uses_layer
from bbdecoder.targets import TargetLike
from bbdecoder.validation import check_positive_int


class GradientSHAP(Explainer):
    """Expected gradients with noise (GradientSHAP).

    Args:
        model: the classifier; ``input_transform``, ``eval_mode``, ``scores_from`` as everywhere.
        seed: seeds the baseline choice, the path points and the noise. Draw ``j`` is the same for
            every sample: the same seed gives every sample the same draws, so a batch equals its
            samples one by one (each sample's draws are still independent across ``j``, so its
            estimate is the usual GradientSHAP mean; only the samples of one batch share them).
        memory_budget_bytes: bytes per forward+backward pass when ``internal_batch_size`` is not given.
        layer: attribute at this layer's output (token ids default to the input embeddings); see
            :class:`~bbdecoder.attribution.base.Explainer`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        seed: int = 0,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        scores_from: str = "logits",
        memory_budget_bytes: int | None = None,
        layer: LayerSpec = None,
    ) -> None:
        super().__init__(
            model, input_transform=input_transform, eval_mode=eval_mode, scores_from=scores_from, layer=layer
        )
        check_positive_int(memory_budget_bytes, "memory_budget_bytes", optional=True)
        self.seed = seed
        self.memory_budget_bytes = memory_budget_bytes

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        baselines: BaselineSpec = "black",
        n_samples: int = 5,
        stdevs: float = 0.0,
        internal_batch_size: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """GradientSHAP attribution shaped like ``inputs``.

        Args:
            baselines: a set of reference inputs ``(B, *sample_shape)`` drawn from uniformly (e.g. a
                few training images), or one baseline as for IG (``"black"``, a number, ...).
            n_samples: draws per sample.
            stdevs: standard deviation of the Gaussian noise added to the inputs.
            internal_batch_size: most rows (sample x draw) per pass; default from the memory budget.

        Token ids, a dict of inputs or ``layer=``: at the layer's output, see
        :func:`~bbdecoder.attribution.layer_attribution.layer_gradient_shap`.
        """
        if uses_layer(self, inputs):
            return layer_gradient_shap(
                self, inputs, target, baselines, n_samples, stdevs, internal_batch_size, **kwargs
            )
        backend = self.backend
        x = backend.prepare(inputs)
        check_positive_int(n_samples, "n_samples")
        if not stdevs >= 0:
            raise ValueError(f"stdevs must be >= 0, got {stdevs}")
        n = x.shape[0]
        references = self.references(baselines, x)
        draws = SharedDraws(self.seed, references.shape[0], n_samples, tuple(x.shape[1:]))
        total_rows = n * n_samples
        target = backend.user_target(target)
        accumulated = torch.zeros_like(x, dtype=torch.float64)
        broadcast = (-1,) + (1,) * (x.dim() - 1)
        with backend.session():
            if target is not None:
                frozen = _per_sample_target(target, n)
            else:
                with torch.no_grad():
                    frozen = backend.freeze(x, None)
            if internal_batch_size is not None:
                check_positive_int(internal_batch_size, "internal_batch_size")
                rows_per_pass = internal_batch_size
            else:
                rows_per_pass = backend.rows_for_budget(x, self.memory_budget_bytes)
            for start in range(0, total_rows, rows_per_pass):
                stop = min(start + rows_per_pass, total_rows)
                samples = torch.arange(start, stop) % n
                draw = torch.arange(start, stop) // n
                noisy = x[samples.to(x.device)]
                if stdevs > 0:
                    noise = draws.noise(draw)
                    noisy = noisy + (stdevs * noise).to(device=x.device, dtype=x.dtype)
                base = references[draws.choice[draw].to(x.device)]
                alpha = draws.alphas[draw].to(device=x.device, dtype=x.dtype).view(broadcast)
                with torch.no_grad():
                    point = base + alpha * (noisy - base)
                grad, _ = backend.input_gradient(point, _rows_of(frozen, samples.to(x.device)), samples)
                accumulated.index_add_(0, samples.to(x.device), ((noisy - base) * grad).to(torch.float64))
        return backend.to_framework((accumulated / n_samples).to(x.dtype))

    def references(self, baselines: BaselineSpec, x: torch.Tensor) -> torch.Tensor:
        """The reference set ``(B, *sample_shape)`` for the prepared ``x``: ``baselines`` itself when it
        is a batch of samples, else the one baseline :func:`make_baseline` makes for the first sample."""
        baselines = self.backend.user_array(baselines, x.dim())
        if (
            isinstance(baselines, torch.Tensor)
            and baselines.dim() == x.dim()
            and baselines.shape[1:] == x.shape[1:]
        ):
            return baselines.detach().to(device=x.device, dtype=x.dtype)
        return self.make_baseline(baselines, x[:1])

    def make_baseline(self, baseline: BaselineSpec, x: torch.Tensor) -> torch.Tensor:
        """One baseline for the prepared ``x``; see :func:`~bbdecoder.attribution.baselines.make_baseline`."""
        return make_baseline(baseline, x)


class SharedDraws:
    """GradientSHAP's random draws for ``n_samples`` draws of one sample, shared by every sample.

    From one generator seeded with ``seed``: the baseline indices ``choice`` ``(n_samples,)``, then the
    path points ``alphas`` ``(n_samples,)`` (float64), then on demand the noise of draw ``0, 1, ...``,
    each a standard normal ``(1, *sample_shape)`` (float64). Draw ``j`` of a row does not depend on
    the batch, and the noise is drawn in the same order however the rows are split into passes.
    Rows must be asked for in increasing order of their draw (as the passes go); only the draws of
    the current pass are held.
    """

    def __init__(self, seed: int, n_references: int, n_samples: int, sample_shape: tuple[int, ...]) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.choice = torch.randint(n_references, (n_samples,), generator=self.generator)
        self.alphas = torch.rand(n_samples, generator=self.generator, dtype=torch.float64)
        self.shape = (1, *sample_shape)
        self.held: dict[int, torch.Tensor] = {}
        self.next = 0

    def noise(self, draw: torch.Tensor) -> torch.Tensor:
        """The noise of rows whose draws are ``draw`` (ints, from the current pass on):
        ``(len(draw), *sample_shape)``."""
        first, last = int(draw.min()), int(draw.max())
        if first < min(self.held, default=first):
            raise RuntimeError("GradientSHAP's draws must be asked for in increasing order")
        self.held = {j: value for j, value in self.held.items() if j >= first}
        while self.next <= last:
            self.held[self.next] = torch.randn(self.shape, generator=self.generator, dtype=torch.float64)
            self.next += 1
        return torch.cat([self.held[j] for j in range(first, last + 1)])[draw - first]
