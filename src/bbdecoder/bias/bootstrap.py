"""Percentile bootstrap of a mean, NaN-aware and vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval; ``n`` valid values, ``n_nan`` NaNs left out."""

    mean: float
    low: float
    high: float
    n: int
    n_nan: int


def bootstrap_ci(
    values: torch.Tensor, *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0, chunk: int = 256
) -> Interval:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (1-D).

    NaNs are dropped and counted. With no valid value every field is NaN; with one, the interval is
    that value. Resamples are drawn with a seeded generator (same seed, same interval).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    flat = torch.as_tensor(values).detach().flatten().double().cpu()
    valid = flat[~torch.isnan(flat)]
    n, n_nan = int(valid.numel()), int(flat.numel() - valid.numel())
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, n_nan)
    mean = float(valid.mean())
    generator = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = torch.randint(0, n, (rows, n), generator=generator)
        means.append(valid[idx].mean(dim=1))
    boot = torch.cat(means)
    alpha = (1 - ci) / 2
    low, high = torch.quantile(boot, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return Interval(mean, float(low), float(high), n, n_nan)
