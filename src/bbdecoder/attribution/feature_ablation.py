"""Feature ablation: replace one group of input elements (a feature) by a baseline at a time."""

from __future__ import annotations

from typing import Any

import torch

from bbdecoder.attribution.perturbation import PerturbationExplainer, broadcast_to_inputs, check_feature_mask
from bbdecoder.targets import TargetLike


class FeatureAblation(PerturbationExplainer):
    """``F(x) - F(x with feature f set to the baseline)``, given to every element of feature f.

    ``attribute(x, target, feature_mask=None, baselines=0.0)``: ``feature_mask`` holds an integer
    feature id per element, broadcastable to the inputs: ``(N or 1, C or 1, H, W)``, e.g. superpixel
    labels (one map for all channels) or ``torch.arange``-style patch ids. Ids are 0..M-1; feature f
    is ablated in every sample at once (a sample without id f gets no change from it). ``None``: every
    element is its own feature (C x H x W forward passes per sample). Captum's ``FeatureAblation``.
    """

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        feature_mask: torch.Tensor | None = None,
        baselines: float | torch.Tensor = 0.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attribution shaped like ``inputs``: each element holds its feature's score drop."""
        backend = self.backend
        x = backend.prepare(inputs)
        mask, n_features = check_feature_mask(backend.user_array(feature_mask, x.dim()), x)
        background = broadcast_to_inputs(backend.user_array(baselines, x.dim()), x, "baselines")
        n = x.shape[0]
        with self.session():
            base_scores, frozen = self.clean_scores(x, target)

            def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
                rows = torch.arange(start, stop, device=x.device)
                samples, features = rows % n, rows // n
                ablate = mask[samples] == features.view((-1,) + (1,) * (x.dim() - 1))
                return torch.where(ablate, background[samples], x[samples]), samples

            scores = self.score_rows(x, make, n * n_features, frozen, what="features")
        drops = base_scores.to(torch.float64).repeat(n_features) - scores
        per_feature = drops.view(n_features, n).t()  # (N, M)
        return backend.to_framework(per_feature.gather(1, mask.flatten(1)).view(x.shape).to(x.dtype))
