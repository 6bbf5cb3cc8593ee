"""Weight snapshots: histograms on fixed bins, quantiles and summary statistics."""

from __future__ import annotations

import numpy as np
import torch

from bbdecoder.store.vocabulary import QUANTILES, quantile_name, weight_stat_names

__all__ = ["QUANTILES", "fixed_range", "histogram", "quantile_name", "weight_stat_names", "weight_statistics"]


def fixed_range(weight: torch.Tensor, margin: float = 1.5) -> tuple[float, float]:
    """Symmetric histogram range chosen once per tensor: ``margin * max|W|`` over the finite
    values (at least 1e-3, so a diverged or all-zero tensor still gets a usable range)."""
    magnitude = weight.detach().abs()
    finite = magnitude[torch.isfinite(magnitude)]
    r = float(finite.max()) * margin if finite.numel() else 0.0
    r = max(r, 1e-3)
    return -r, r


def histogram(weight: torch.Tensor, lo: float, hi: float, nbins: int) -> np.ndarray:
    """Counts on ``nbins`` equal bins of ``[lo, hi]``; out-of-range values go to the end bins,
    NaN is left out (+-Inf count in the end bins)."""
    flat = weight.detach().reshape(-1).float()
    flat = flat[~torch.isnan(flat)].clamp(lo, hi)
    return torch.histc(flat, bins=nbins, min=lo, max=hi).to(torch.int64).cpu().numpy()


def weight_statistics(weights: list[torch.Tensor], quantiles: tuple[float, ...] = QUANTILES) -> np.ndarray:
    """``(n, 3 + len(quantiles))`` float64 rows in the order of :func:`weight_stat_names`.

    Quantiles interpolate linearly between order statistics (NumPy's default), via a sort, so
    tensors of any size work (``torch.quantile`` refuses more than 16M elements).
    """
    rows = []
    for w in weights:
        flat = w.detach().reshape(-1).double()
        std, mean = torch.std_mean(flat, correction=0)
        ordered = flat.sort().values
        pos = torch.tensor(quantiles, dtype=torch.float64, device=flat.device) * (flat.numel() - 1)
        lo_i = pos.floor().long()
        hi_i = pos.ceil().long()
        qs = ordered[lo_i] + (ordered[hi_i] - ordered[lo_i]) * (pos - lo_i)
        rows.append(torch.cat([torch.stack([mean, std, flat.norm()]), qs]))
    if not rows:
        return np.zeros((0, 3 + len(quantiles)))
    return torch.stack(rows).cpu().numpy()
