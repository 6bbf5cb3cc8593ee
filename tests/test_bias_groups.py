"""Grouping, bootstrap intervals, across-seed spread, tables, figures and attention maps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient
from bbdecoder.bias import (
    across_seeds,
    attention_maps,
    bootstrap_ci,
    format_table,
    group_scores,
    mask_score,
)
from bbdecoder.viz.metric_plots import plot_bias_examples, plot_group_scores


def test_bootstrap_matches_the_normal_approximation_and_is_seeded() -> None:
    values = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 2 + 1
    interval = bootstrap_ci(values, n_boot=2000, seed=1)
    half_width = 1.96 * float(values.std()) / math.sqrt(4000)
    assert interval.mean == pytest.approx(float(values.double().mean()))
    assert interval.high - interval.low == pytest.approx(2 * half_width, rel=0.1)
    assert interval.low < interval.mean < interval.high
    assert bootstrap_ci(values, n_boot=2000, seed=1) == interval


def test_bootstrap_counts_nan_and_handles_degenerate_groups() -> None:
    values = torch.tensor([0.2, float("nan"), 0.4, float("nan")])
    interval = bootstrap_ci(values)
    assert (interval.n, interval.n_nan) == (2, 2) and interval.mean == pytest.approx(0.3)
    single = bootstrap_ci(torch.tensor([0.7]))
    assert single.low == single.high == pytest.approx(0.7)
    empty = bootstrap_ci(torch.tensor([float("nan")]))
    assert math.isnan(empty.mean) and empty.n_nan == 1
    with pytest.raises(ValueError, match="ci"):
        bootstrap_ci(values, ci=95)


def test_group_scores_match_direct_means() -> None:
    g = torch.Generator().manual_seed(2)
    n = 300
    scores = torch.rand(n, generator=g)
    scores[:7] = float("nan")
    target = torch.randint(0, 2, (n,), generator=g)
    protected = torch.randint(0, 2, (n,), generator=g)
    predicted = torch.where(torch.rand(n, generator=g) < 0.8, target, 1 - target)
    table = group_scores({"spurious": scores}, target, protected, predicted, n_boot=200)
    frame = pd.DataFrame(
        {"s": scores.numpy(), "t": target.numpy(), "p": protected.numpy(), "y": predicted.numpy()}
    )
    row = table.set_index("group")
    for t in (0, 1):
        for p in (0, 1):
            cell = frame[(frame.t == t) & (frame.p == p)]
            assert row.loc[f"target={t},protected={p}", "mean"] == pytest.approx(cell.s.mean())
            assert row.loc[f"target={t},protected={p}", "n"] == len(cell)
    assert row.loc["same", "mean"] == pytest.approx(frame[frame.t == frame.p].s.mean())
    assert row.loc["different", "mean"] == pytest.approx(frame[frame.t != frame.p].s.mean())
    assert row.loc["incorrect", "mean"] == pytest.approx(frame[frame.t != frame.y].s.mean())
    assert row.loc["all", "n_nan"] == 7 and row.loc["all", "n"] == n
    assert (table["ci_low"] <= table["mean"]).all() and (table["mean"] <= table["ci_high"]).all()
    with pytest.raises(ValueError, match="one per image"):
        group_scores(scores, target[:-1], protected)


def test_across_seeds_mean_and_spread() -> None:
    tables = [
        pd.DataFrame({"region": ["r", "r"], "group": ["all", "same"], "kind": ["all", "relation"], "mean": m})
        for m in ([0.1, 0.5], [0.3, 0.4], [0.2, 0.9])
    ]
    out = across_seeds(tables).set_index("group")
    assert out.loc["all", "mean"] == pytest.approx(0.2)
    assert out.loc["same", "std"] == pytest.approx(np.std([0.5, 0.4, 0.9], ddof=1))
    assert (out["n_seeds"] == 3).all()


def test_table_and_figure(tmp_path) -> None:
    scores = mask_score(torch.rand(40, 8, 8), {"a": (torch.rand(40, 8, 8) > 0.5).float()})
    table = scores.groups(torch.randint(0, 2, (40,)), torch.randint(0, 2, (40,)), n_boot=100)
    assert set(table["resolution"]) == {"8x8"}
    text = format_table(table[["group", "n", "mean", "ci_low", "ci_high"]])
    lines = text.splitlines()
    assert lines[0].startswith("| group | n | mean") and lines[1].startswith("|---")
    assert len(lines) == 2 + len(table)
    path = tmp_path / "groups.png"
    plot_group_scores(table.assign(model="m"), path)
    assert path.stat().st_size > 5000
    path = tmp_path / "examples.png"
    plot_bias_examples(
        torch.rand(2, 3, 8, 8), {"m": torch.rand(2, 1, 8, 8)}, {"a": torch.rand(2, 8, 8)}, path
    )
    assert path.stat().st_size > 5000


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()


def test_attention_maps_default_to_gradcam_and_batch_exactly() -> None:
    model = _cnn()
    x = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = [0, 1, 1, 0, 1, 0, 0]
    maps = attention_maps(model, x, labels, batch_size=3)
    torch.testing.assert_close(maps, GradCAM(model).saliency(x, labels))
    other = attention_maps(model, x, torch.tensor(labels), explainer=Gradient(model), batch_size=2)
    torch.testing.assert_close(other, Gradient(model).saliency(x, labels))
    with pytest.raises(TypeError, match="saliency"):
        attention_maps(model, x, explainer=object())
