"""RISE (Petsiuk, Das & Saenko, BMVC 2018): random masks weighted by the scores they leave."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.attribution.base import InputTransform
from bbdecoder.attribution.perturbation import PerturbationExplainer, broadcast_to_inputs
from bbdecoder.targets import TargetLike
from bbdecoder.validation import check_positive_int


class RISE(PerturbationExplainer):
    """``S = 1 / (p * n_masks) * sum_i score(x * M_i + b * (1 - M_i)) * M_i``.

    Each mask ``M_i`` is a ``grid_size x grid_size`` grid of cells kept with probability ``p``,
    upsampled bilinearly to ``(grid_size + 1) * cell`` (``cell = ceil(H / grid_size)``) and cropped at a
    random shift in ``[0, cell)``, as in the paper. Masks are drawn from a seeded ``torch.Generator``
    (CPU) chunk by chunk, never all at once. The default score is the target's softmax probability
    (the paper's); ``score="logit"`` uses the logit.

    Args:
        model: the classifier.
        n_masks: masks per image (the paper uses 4000 for ResNet-50; fewer are noisier).
        grid_size: cells per side of a mask (the paper: 7).
        p: probability that a cell is kept.
        seed: the same seed gives the same masks.
        input_transform: as for every explainer; see
            :class:`~bbdecoder.attribution.perturbation.PerturbationExplainer` for it and the
            other arguments (``eval_mode``, ``scores_from``, ``batch_size``, ``progress``, ``score``).
    """

    default_score = "probability"

    def __init__(
        self,
        model: nn.Module,
        *,
        n_masks: int = 4000,
        grid_size: int = 7,
        p: float = 0.5,
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
        check_positive_int(n_masks, "n_masks")
        check_positive_int(grid_size, "grid_size")
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        self.n_masks, self.grid_size, self.p, self.seed = n_masks, grid_size, float(p), seed

    def masks(self, start: int, stop: int, spatial: tuple[int, int]) -> torch.Tensor:
        """Masks ``start..stop-1`` of the seeded sequence, (stop - start, 1, H, W) float64 on the CPU."""
        h, w = spatial
        s = self.grid_size
        cell_h, cell_w = math.ceil(h / s), math.ceil(w / s)
        out = []
        for index in range(start, stop):
            generator = torch.Generator().manual_seed((self.seed * 2**32 + index) % 2**63)
            grid = (torch.rand(1, 1, s, s, generator=generator, dtype=torch.float64) < self.p).double()
            up = F.interpolate(
                grid, size=((s + 1) * cell_h, (s + 1) * cell_w), mode="bilinear", align_corners=False
            )
            dy = int(torch.randint(cell_h, (1,), generator=generator))
            dx = int(torch.randint(cell_w, (1,), generator=generator))
            out.append(up[:, :, dy : dy + h, dx : dx + w])
        return torch.cat(out)

    def attribute(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        baselines: float | torch.Tensor = 0.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The RISE map broadcast to the inputs' shape (N, C, H, W) (the same map in every channel)."""
        x = self.backend.prepare(inputs, min_dim=4)
        return self.backend.to_framework(self._map(x, target, baselines).expand_as(x).clone())

    def saliency(
        self,
        inputs: torch.Tensor,
        target: TargetLike = None,
        baselines: float | torch.Tensor = 0.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The RISE map (N, 1, H, W); non-negative with the default probability score."""
        x = self.backend.prepare(inputs, min_dim=4)
        return self.backend.to_framework(self._map(x, target, baselines))

    def _map(self, x: torch.Tensor, target: TargetLike, baselines: Any) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"RISE takes images (N, C, H, W), got shape {tuple(x.shape)}")
        n, spatial = x.shape[0], (x.shape[2], x.shape[3])
        background = broadcast_to_inputs(self.backend.user_array(baselines, x.dim()), x, "baselines")
        accumulated = torch.zeros((n, 1, *spatial), dtype=torch.float64, device=x.device)
        with self.session():
            _, frozen = self.clean_scores(x, target)
            rows_per_pass = self.rows_per_pass(x)
            masks_per_pass = max(1, rows_per_pass // n)
            for first in self._progress(
                range(0, self.n_masks, masks_per_pass), -(-self.n_masks // masks_per_pass), "masks"
            ):
                last = min(first + masks_per_pass, self.n_masks)
                masks = self.masks(first, last, spatial).to(device=x.device)
                kept = masks.to(x.dtype).repeat_interleave(n, dim=0)  # mask-major rows
                samples = torch.arange(n, device=x.device).repeat(last - first)
                rows = x[samples] * kept + background[samples] * (1 - kept)
                scores = self.row_scores(rows, frozen, samples).to(torch.float64)
                weighted = scores.view(last - first, n, 1, 1, 1) * masks.view(last - first, 1, 1, *spatial)
                accumulated += weighted.sum(dim=0)
        return (accumulated / (self.p * self.n_masks)).to(x.dtype)
