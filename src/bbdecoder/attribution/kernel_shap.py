"""Kernel SHAP (Lundberg & Lee, NeurIPS 2017): Shapley values from a weighted linear regression.

Features (groups of input elements, from a feature mask) are either kept or set to the baseline; a
coalition z in {0, 1}^M scores ``f(z) = F(x where z, baseline elsewhere)``. The Shapley values are the
solution of the regression ``f(z) ~ phi_0 + sum_i phi_i z_i`` over coalitions weighted by the Shapley
kernel ``(M - 1) / (C(M, |z|) |z| (M - |z|))``, with ``phi_0 = f(0)`` and ``sum phi = f(1) - f(0)``
enforced exactly (the empty and full coalitions have infinite weight). With every coalition
enumerated and weighted by the kernel this *is* the Shapley value (exact); with fewer samples,
coalition sizes are drawn with probability proportional to the kernel's total weight per size and the
regression is unweighted, the standard Monte Carlo estimate.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.base import InputTransform
from bbdecoder.attribution.perturbation import PerturbationExplainer, broadcast_to_inputs, check_feature_mask
from bbdecoder.targets import TargetLike
from bbdecoder.validation import check_positive_int

MAX_FEATURES = 4096
ENUMERATE_UP_TO = 16
"""Features up to which all 2^M - 2 coalitions are enumerated when ``n_samples`` allows it."""


class KernelSHAP(PerturbationExplainer):
    """Kernel SHAP over the features of a feature mask.

    ``attribute(x, target, feature_mask=None, baselines=0.0, n_samples=None)`` -> shaped like ``x``:
    each element holds its feature's Shapley value. ``n_samples``: coalitions per sample (default
    ``2 * M + 2048``); when it covers all ``2^M - 2`` non-trivial coalitions (and M <= 16) they are
    enumerated and the values are exact. ``feature_mask``: integer ids (N or 1, C or 1, H, W), e.g.
    superpixels; ``None`` = every element (only for small inputs; at most 4096 features).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        seed: int = 0,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
        scores_from: str = "logits",
        batch_size: int | None = None,
        progress: bool | None = None,
        score: str | None = None,
    ) -> None:
        super().__init__(
            model,
            input_transform=input_transform,
            eval_mode=eval_mode,
            scores_from=scores_from,
            batch_size=batch_size,
            progress=progress,
            score=score,
        )
        self.seed = seed
        self.last_exact: bool | None = None

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        feature_mask: torch.Tensor | None = None,
        baselines: float | torch.Tensor = 0.0,
        n_samples: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Shapley values per element, shaped like ``inputs``; ``last_exact`` says if they were enumerated."""
        backend = self.backend
        x = backend.prepare(inputs)
        mask, m = check_feature_mask(backend.user_array(feature_mask, x.dim()), x)
        if m > MAX_FEATURES:
            raise ValueError(
                f"KernelSHAP over {m} features needs an {m} x {m} regression; group the elements with a "
                f"feature_mask (superpixels, patches) to at most {MAX_FEATURES} features"
            )
        check_positive_int(n_samples, "n_samples", optional=True)
        samples_wanted = 2 * m + 2048 if n_samples is None else n_samples
        coalitions, weights, exact = self._coalitions(m, samples_wanted, x.device)
        self.last_exact = exact
        background = broadcast_to_inputs(backend.user_array(baselines, x.dim()), x, "baselines")
        n, k = x.shape[0], coalitions.shape[0] - 1  # the last coalition is the empty one
        with self.session():
            full_scores, frozen = self.clean_scores(x, target)

            def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
                rows = torch.arange(start, stop, device=x.device)
                samples, which = rows % n, rows // n
                kept = coalitions[which].gather(1, mask[samples].flatten(1)).view((-1, *x.shape[1:]))
                return torch.where(kept, x[samples], background[samples]), samples

            scores = self.score_rows(x, make, n * (k + 1), frozen, what="coalitions")
        values = scores.view(k + 1, n)
        empty, y = values[k], values[:k]  # the last row block is the empty coalition (all baseline)
        delta = full_scores.to(torch.float64) - empty
        phi = _constrained_regression(coalitions[:k].double(), weights, y - empty, delta)  # (N, M)
        return backend.to_framework(phi.gather(1, mask.flatten(1)).view(x.shape).to(x.dtype))

    def _coalitions(
        self, m: int, wanted: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(K + 1, M) bool coalitions, the last one empty, and the (K,) regression weights."""
        empty = torch.zeros(1, m, dtype=torch.bool)
        if m == 1:
            return empty.to(device), torch.zeros(0, dtype=torch.float64, device=device), True
        if m <= ENUMERATE_UP_TO and wanted >= 2**m - 2:
            rows = [z for z in itertools.product((False, True), repeat=m) if 0 < sum(z) < m]
            coalitions = torch.tensor(rows, dtype=torch.bool)
            sizes = coalitions.sum(1).double()
            weights = (m - 1) / (
                torch.tensor([math.comb(m, int(s)) for s in sizes], dtype=torch.float64) * sizes * (m - sizes)
            )
            return torch.cat([coalitions, empty]).to(device), weights.to(device), True
        generator = torch.Generator().manual_seed(self.seed)
        sizes = torch.arange(1, m, dtype=torch.float64)
        size_probability = (m - 1) / (sizes * (m - sizes))  # kernel weight summed over all subsets of a size
        drawn = torch.multinomial(size_probability, wanted, replacement=True, generator=generator) + 1
        order = torch.rand(wanted, m, generator=generator).argsort(dim=1)
        coalitions = order < drawn[:, None]  # a uniform random subset of each drawn size
        weights = torch.ones(wanted, dtype=torch.float64)
        return torch.cat([coalitions, empty]).to(device), weights.to(device), False


def _constrained_regression(
    z: torch.Tensor, w: torch.Tensor, y: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """argmin_phi sum_k w_k (y_k - z_k . phi)^2 subject to sum(phi) = delta, for N right-hand sides.

    ``z`` (K, M), ``w`` (K,), ``y`` (K, N), ``delta`` (N,) -> (N, M). The constraint is eliminated by
    writing ``phi_M = delta - sum_{i<M} phi_i``.
    """
    m = z.shape[1]
    if m == 1:
        return delta[:, None]
    design = z[:, :-1] - z[:, -1:]  # (K, M-1)
    rhs = y - z[:, -1:] * delta[None, :]  # (K, N)
    root = w.sqrt()[:, None]
    solution = torch.linalg.lstsq(design * root, rhs * root).solution  # (M-1, N)
    phi = torch.cat([solution, (delta - solution.sum(0))[None, :]], dim=0)
    return phi.t()
