"""The summary every metric attaches to its per-sample numbers."""

from __future__ import annotations

import torch


def summarise(values: torch.Tensor) -> dict[str, float]:
    """``n, n_nan, mean, std, median, min, max`` of a 1-D tensor of per-sample numbers (NaNs left out)."""
    flat = values.detach().flatten().double().cpu()
    valid = flat[~torch.isnan(flat)]
    nan = float("nan")
    if valid.numel() == 0:
        return {
            "n": 0.0,
            "n_nan": float(flat.numel()),
            "mean": nan,
            "std": nan,
            "median": nan,
            "min": nan,
            "max": nan,
        }
    return {
        "n": float(valid.numel()),
        "n_nan": float(flat.numel() - valid.numel()),
        "mean": float(valid.mean()),
        "std": float(valid.std(unbiased=False)),
        "median": float(valid.median()),
        "min": float(valid.min()),
        "max": float(valid.max()),
    }
