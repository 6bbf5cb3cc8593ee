"""IG's default rows per pass: new activations only (in-place results and views not counted), the
memory budget, and on CPU the pass target where passes are fastest per row."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bbdecoder.attribution.memory as memory
from bbdecoder import IntegratedGradients


def test_in_place_results_and_views_are_not_counted() -> None:
    model = nn.Sequential(
        nn.Linear(10, 20), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Flatten(), nn.Linear(20, 5)
    )
    explainer = IntegratedGradients(model)
    with explainer.session():
        counted = memory.activation_bytes_per_row(explainer, torch.randn(3, 10))
    # input 10, Linear 20, Linear 5 and the model's output 5 (the same tensor, counted as the output)
    assert counted == 4 * (10 + 20 + 5 + 5)
    copying = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    explainer = IntegratedGradients(copying)
    with explainer.session():
        assert memory.activation_bytes_per_row(explainer, torch.randn(3, 10)) == 4 * (10 + 20 + 20 + 5 + 5)


def test_cpu_rows_are_capped_at_the_pass_target(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Tanh(), nn.Linear(50, 10))
    per_row = 4 * (100 + 50 + 50 + 10 + 10)
    explainer = IntegratedGradients(model)
    x = torch.randn(2, 100)
    with explainer.session():
        assert memory.rows_for_budget(explainer, x, 10**9) == memory.CPU_PASS_TARGET_BYTES // per_row + 1
        monkeypatch.setattr(memory, "CPU_PASS_TARGET_BYTES", 7 * per_row)
        assert memory.rows_for_budget(explainer, x, 10**9) == 7  # the speed target binds
        assert (
            memory.rows_for_budget(explainer, x, int(3 * per_row * memory.GRAD_MEMORY_FACTOR)) == 3
        )  # memory binds
        assert memory.rows_for_budget(explainer, x, 1) == 1
