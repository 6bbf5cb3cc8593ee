"""Alerts on a model that converges: no false alarm once the loss is near zero (gradients orders of
magnitude below those it learned with, so one harder batch lifts them 10x above their recent median),
none for a near-zero bias whose layer barely moves, and a bad batch late in that same run still
explodes."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.alerts import AlertConfig, AlertEngine, evaluate_run
from bbdecoder.monitor import Analyzer

STEPS = 100
BAD = 80  # the step of the bad batch


def converge(root: Path, *, bad_batch: bool = False) -> tuple[list[tuple[str, int | None, str]], list[float]]:
    """100 AdamW steps (one-cycle learning rate) of a small MLP on separable data with
    2% of the points near the boundary; ``bad_batch``: step 80 gets a corrupted batch (inputs not
    normalised, 100x too large, and wrong labels). Returns (kind, step, param) of every live alert
    and the losses."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 512
    x = torch.randn(n, 4, generator=g)
    y = (torch.rand(n, generator=g) < 0.5).long()
    near = torch.rand(n, generator=g) < 0.02
    x[:, 0] = (2 * y - 1) * torch.where(near, 0.1, 2.0 + x[:, 0].abs())
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=STEPS)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Analyzer(net, root) as analyzer:
            for step in range(STEPS):
                index = torch.randint(0, n, (32,), generator=g)
                inputs, labels = x[index], y[index]
                if bad_batch and step == BAD:
                    inputs, labels = inputs * 100.0, 1 - labels
                loss = F.cross_entropy(analyzer.forward_propagation(inputs), labels)
                optimizer.zero_grad()
                analyzer.backward_propagation(loss)
                optimizer.step()
                schedule.step()
                losses.append(float(loss))
    assert analyzer.alerts is not None
    return [(a.kind, a.step, a.param) for a in analyzer.alerts.alerts], losses


def test_a_converged_model_raises_no_alert(tmp_path: Path) -> None:
    alerts, losses = converge(tmp_path)
    assert max(losses[-20:]) < 0.1 and min(losses[-20:]) < 2e-3  # converged, with harder batches
    assert alerts == []
    assert evaluate_run(tmp_path) == []
    # the scenario is the one the floors are for: without them, harder batches late in training
    # "explode" and "spike"
    unfloored = evaluate_run(tmp_path, AlertConfig(explode_floor=0.0, loss_floor=0.0))
    late = {a.kind for a in unfloored if a.step is not None and a.step >= 40}
    assert {"exploding_grad", "loss_spike"} <= late


def test_a_bad_batch_late_in_a_converged_run_still_explodes(tmp_path: Path) -> None:
    alerts, _ = converge(tmp_path, bad_batch=True)
    assert all(step is not None and step >= BAD for _, step, _ in alerts)  # nothing before it
    exploded = {param for kind, step, param in alerts if kind == "exploding_grad" and step == BAD}
    assert "0.weight" in exploded  # the layer that sees the raw inputs
    assert ("loss_spike", BAD, "") in alerts
    assert {(a.kind, a.step, a.param) for a in evaluate_run(tmp_path) if a.kind != "nonfinite_grad"} == set(
        alerts
    )


def ratio_rows(step: int, values: dict[str, float]) -> list[tuple]:
    return [
        (step, 0, 0 if name.startswith("norm") else 1, "x", name, "update_ratio", v)
        for name, v in values.items()
    ]


def test_a_bias_is_out_of_band_only_with_its_weight() -> None:
    engine = AlertEngine(AlertConfig(ratio_warmup=0), warn=False)
    engine.observe(ratio_rows(0, {"norm.weight": 2e-3, "norm.bias": 1.4, "scale": 0.01}))
    assert engine.alerts == []  # a near-zero bias jittering: its layer barely moves
    engine.observe(ratio_rows(1, {"norm.weight": 0.9, "norm.bias": 1.4, "scale": 0.01}))
    engine.observe(ratio_rows(2, {"norm.weight": 1e-3, "norm.bias": 1e-3, "scale": 3.0}))
    got = [(a.kind, a.step, a.param) for a in engine.alerts]
    assert got == [
        ("update_ratio_out_of_band", 1, "norm.weight"),
        ("update_ratio_out_of_band", 1, "norm.bias"),  # the whole layer jumped
        ("update_ratio_out_of_band", 2, "scale"),  # no weight beside it: its own ratio decides
    ]


def test_a_loss_given_with_log_is_judged_live_as_on_replay(tmp_path: Path) -> None:
    """The attach(optimizer) + log(loss=...) loop of the demos: the loss reaches the writer through
    set_loss, and the live loss rule must see it (a planted spike at step 30)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Analyzer(net, tmp_path) as analyzer:
            analyzer.attach(optimizer)
            for step in range(40):
                x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
                loss = F.cross_entropy(net(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                analyzer.log(loss=loss.detach() * (50.0 if step == 30 else 1.0))
    assert analyzer.alerts is not None
    live = [(a.kind, a.step) for a in analyzer.alerts.alerts if a.kind == "loss_spike"]
    assert live == [("loss_spike", 30)]
    assert [(a.kind, a.step) for a in evaluate_run(tmp_path) if a.kind == "loss_spike"] == live
