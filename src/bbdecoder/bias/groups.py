"""Scores averaged per group: (target, protected) cells, same/different, correct/incorrect, seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from bbdecoder.bias.bootstrap import bootstrap_ci

GROUP_COLUMNS = ["region", "group", "kind", "n", "n_nan", "mean", "ci_low", "ci_high"]


def _labels(values: Any, n: int, name: str) -> torch.Tensor:
    labels = torch.as_tensor(values).detach().cpu().flatten()
    if labels.numel() != n:
        raise ValueError(f"{name} has {labels.numel()} entries but there are {n} scores; give one per image")
    return labels


def group_masks(
    target_labels: torch.Tensor, protected_labels: torch.Tensor, predictions: torch.Tensor | None = None
) -> list[tuple[str, str, torch.Tensor]]:
    """``(group, kind, boolean mask)`` for every group reported by :func:`group_scores`."""
    groups: list[tuple[str, str, torch.Tensor]] = [
        ("all", "all", torch.ones_like(target_labels, dtype=torch.bool))
    ]
    for t in torch.unique(target_labels).tolist():
        for p in torch.unique(protected_labels).tolist():
            cell = (target_labels == t) & (protected_labels == p)
            if bool(cell.any()):
                groups.append((f"target={t:g},protected={p:g}", "cell", cell))
    same = target_labels == protected_labels
    groups += [("same", "relation", same), ("different", "relation", ~same)]
    if predictions is not None:
        correct = predictions == target_labels
        groups += [("correct", "prediction", correct), ("incorrect", "prediction", ~correct)]
    return groups


def group_scores(
    scores: torch.Tensor | Mapping[str, torch.Tensor],
    target_labels: Any,
    protected_labels: Any,
    predictions: Any = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean score with a bootstrap confidence interval for every group of images.

    Groups: ``all``; each ``(target, protected)`` label cell; ``same`` (target label == protected
    label) and ``different``; with ``predictions``, ``correct`` and ``incorrect`` (prediction == target
    label). NaN scores (empty maps or masks) are left out of the means and counted in ``n_nan``.

    Args:
        scores: (N,) or a dict ``region -> (N,)`` (e.g. :attr:`BiasScores.scores`).
        target_labels, protected_labels: (N,) labels; predictions: (N,) predicted target labels.

    Returns:
        DataFrame with columns ``region, group, kind, n, n_nan, mean, ci_low, ci_high``.
    """
    named = dict(scores) if isinstance(scores, Mapping) else {"score": scores}
    rows = []
    for region, values in named.items():
        values = torch.as_tensor(values).detach().cpu().flatten()
        n = values.numel()
        target = _labels(target_labels, n, "target_labels")
        protected = _labels(protected_labels, n, "protected_labels")
        predicted = None if predictions is None else _labels(predictions, n, "predictions")
        for group, kind, mask in group_masks(target, protected, predicted):
            interval = bootstrap_ci(values[mask], n_boot=n_boot, ci=ci, seed=seed)
            rows.append(
                {
                    "region": region,
                    "group": group,
                    "kind": kind,
                    "n": int(mask.sum()),
                    "n_nan": interval.n_nan,
                    "mean": interval.mean,
                    "ci_low": interval.low,
                    "ci_high": interval.high,
                }
            )
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def across_seeds(tables: Sequence[pd.DataFrame], value: str = "mean") -> pd.DataFrame:
    """Mean and spread of ``value`` across runs with different seeds (one table per seed).

    Returns:
        DataFrame with ``region, group, kind, n_seeds, mean, std`` (sample std, ddof=1; NaN for
        one seed), rows in the order of the first table.
    """
    if not tables:
        raise ValueError("across_seeds needs at least one table")
    stacked = pd.concat([t.assign(seed_index=i) for i, t in enumerate(tables)], ignore_index=True)
    if value not in stacked:
        raise KeyError(f"the tables have no column {value!r}; columns are {list(stacked.columns)}")
    keys = ["region", "group", "kind"]
    grouped = stacked.groupby(keys, sort=False)[value]
    out = grouped.agg(n_seeds="count", mean="mean", std="std").reset_index()
    return out
