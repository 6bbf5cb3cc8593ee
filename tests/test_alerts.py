"""Alerts: planted anomalies in real training (a NaN at a known step, a learning-rate spike, dead units
appearing) raise their alert at the right step and nothing before; a healthy run raises none; each
rule fires exactly at the onset on hand-made series; alerts are stored as events, replayed from the
store identically, warned once per kind, and shown in the report."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.alerts import ALERT_KINDS, AlertConfig, AlertEngine, AlertWarning, evaluate_run
from bbdecoder.monitor import Analyzer
from bbdecoder.report import build_report
from bbdecoder.store import open_run

K = 40  # the planted step
STEPS = 60


class Shift(nn.Module):
    """Adds a per-channel buffer (not a parameter: editing it is not an optimizer update)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset.view(1, -1, 1, 1)


def train(root: Path, plant: str | None) -> tuple[list[tuple[str, int | None, str]], list[str]]:
    """60 SGD steps of a small CNN with the alert engine attached to the Analyzer's writer; the
    anomaly ``plant`` happens at step K. Returns (kind, step, param) of every alert and the warnings."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), Shift(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 3),
    )  # fmt: skip
    head = [*net[5].parameters(), *net[7].parameters()]
    optimizer = torch.optim.SGD([{"params": net[0].parameters()}, {"params": head}], lr=0.05)
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(256, 1, 6, 6, generator=g)
    y_all = (x_all.mean((1, 2, 3)) > 0).long() + (x_all[:, :, :3].mean((1, 2, 3)) > 0).long()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Analyzer(net, root, input_size=(1, 1, 6, 6), activations=nn.ReLU) as analyzer:
            engine = analyzer.alerts  # on by default
            for step in range(STEPS):
                index = torch.randint(0, 256, (16,), generator=g)
                x, y = x_all[index], y_all[index]
                if plant == "nan" and step == K:
                    x = x.clone()
                    x[0, 0, 0, 0] = float("nan")
                if plant == "dead" and step == K:
                    net[1].offset[:6] = -100.0  # 6 of 8 channels never pass the ReLU again
                loss = F.cross_entropy(analyzer.forward_propagation(x), y)
                optimizer.zero_grad()
                analyzer.backward_propagation(loss)
                optimizer.param_groups[1]["lr"] = 20.0 if plant == "lr" and step == K else 0.05
                if all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None):
                    optimizer.step()  # skip non-finite steps, as a GradScaler would
                if step % 10 == 9:
                    analyzer.end_epoch()
    alerts = [(a.kind, a.step, a.param) for a in engine.alerts]
    return alerts, [str(w.message) for w in caught if issubclass(w.category, AlertWarning)]


def stored_alerts(root: Path) -> list[tuple[str, int, str]]:
    with open_run(root) as reader:
        events = reader.events()
    chosen = events[events["kind"].isin(ALERT_KINDS)]
    params = chosen["param"].fillna("")
    return [(k, int(s), p) for k, s, p in zip(chosen["kind"], chosen["step"], params, strict=True)]


def test_healthy_run_raises_no_alert(tmp_path: Path) -> None:
    alerts, warned = train(tmp_path, None)
    assert alerts == [] and warned == []
    assert stored_alerts(tmp_path) == []
    assert evaluate_run(tmp_path) == []


def test_nan_at_a_known_step(tmp_path: Path) -> None:
    alerts, _ = train(tmp_path, "nan")
    assert alerts == []  # the Analyzer reports non-finite gradients itself; the engine does not repeat it
    assert stored_alerts(tmp_path) == [("nonfinite_grad", K, "7.bias")]  # first in backward order
    replay = evaluate_run(tmp_path)
    assert [(a.kind, a.step) for a in replay] == [("nonfinite_grad", K)]


def test_learning_rate_spike_explodes_the_layers_below(tmp_path: Path) -> None:
    alerts, warned = train(tmp_path, "lr")
    assert all(step is not None and step >= K for _, step, _ in alerts)  # nothing before the spike
    first = {}
    for kind, step, param in alerts:
        first.setdefault(kind, (step, param))
    # the update at step K moved the head's weights by more than half their norm ...
    assert first["update_ratio_out_of_band"][0] == K
    ratio_params = {p for k, s, p in alerts if k == "update_ratio_out_of_band" and s == K}
    assert ratio_params == {"5.weight", "5.bias", "7.weight", "7.bias"}  # the spiked group only
    # ... so at K + 1 the loss jumps and the gradient of the first conv (below the head) explodes
    assert first["loss_spike"][0] == K + 1
    assert first["exploding_grad"] == (K + 1, "0.weight")
    assert len(warned) == len(first)  # one warning per kind, the first alert of that kind
    assert {w.split(" at step")[0] for w in warned} == {
        "update ratio out of band", "loss spike", "exploding gradient", *(
            ["dead units rising"] if "dead_units_rising" in first else []
        ),
    }  # fmt: skip
    stored = stored_alerts(tmp_path)
    assert sorted(stored) == sorted((k, s, p) for k, s, p in alerts)  # every alert is an event
    replay = {(a.kind, a.step, a.param) for a in evaluate_run(tmp_path) if a.kind != "nonfinite_grad"}
    assert replay == set(alerts)  # the same rules replayed from the store find the same alerts


def test_dead_units_appearing(tmp_path: Path) -> None:
    alerts, warned = train(tmp_path, "dead")
    end_of_epoch = (K // 10) * 10 + 9  # dead fractions are recorded at the epoch's end
    assert alerts == [("dead_units_rising", end_of_epoch, "")]
    assert len(warned) == 1 and "75.0% dead" in warned[0]
    with open_run(tmp_path) as reader:
        event = reader.events("dead_units_rising").iloc[0]
    assert event["layer"] == "2" and event["data"]["value"] == pytest.approx(0.75)
    text = build_report(tmp_path).read_text()
    assert 'id="alerts"' in text and "dead units rising at step 49" in text


def rows(step: int, values: dict[str, float], stat: str = "l2") -> list[tuple]:
    return [(step, 0, i, f"layer{i}", param, stat, v) for i, (param, v) in enumerate(values.items())]


def test_each_rule_fires_once_at_the_onset() -> None:
    engine = AlertEngine(AlertConfig(ratio_warmup=0), warn=False)
    for step in range(30):
        a = 1.0 + 0.01 * (step % 3)
        b = 1e-9 if step >= 10 else 0.5  # vanishes from step 10
        a = a * 50 if step == 20 else a  # explodes at step 20 only
        engine.observe(rows(step, {"a.weight": a, "b.weight": b}))
        engine.observe(rows(step, {"a.weight": 1e-3 if step != 25 else 0.9}, stat="update_ratio"))
        engine.observe_loss(step, 0, 2.0 - 0.01 * step + (5.0 if step == 15 else 0.0))
    got = [(a.kind, a.step, a.param) for a in engine.alerts]
    assert got == [
        ("vanishing_grad", 12, "b.weight"),  # three consecutive low steps: 10, 11, 12
        ("loss_spike", 15, ""),
        ("exploding_grad", 20, "a.weight"),
        ("update_ratio_out_of_band", 25, "a.weight"),
    ]
    # a vanished gradient stays one alert; a new onset after recovery is a new alert
    engine.observe(rows(30, {"a.weight": 1.0, "b.weight": 0.5}))
    for step in range(31, 34):
        engine.observe(rows(step, {"a.weight": 1.0, "b.weight": 0.0}))
    # the recovery from 1e-9 back to 0.5 jumps against the recent history but only returns to the
    # scale the gradient had before it vanished: not an explosion (the floor, explode_floor)
    assert [(a.kind, a.step) for a in engine.alerts[4:]] == [("vanishing_grad", 33)]


def layer_rows(step: int, weight: float, bias: float) -> list[tuple]:
    """A conv layer's weight and bias norms beside a healthy head."""
    return [
        (step, 0, 0, "conv", "conv.weight", "l2", weight),
        (step, 0, 0, "conv", "conv.bias", "l2", bias),
        (step, 0, 1, "fc", "fc.weight", "l2", 0.5),
    ]


def test_a_gradient_zero_by_construction_is_not_vanishing() -> None:
    """A conv bias followed by BatchNorm has a zero gradient (up to rounding) from the first step."""
    engine = AlertEngine(warn=False)
    for step in range(20):
        engine.observe(rows(step, {"a.weight": 1.0, "conv.bias": 3e-14 * (1 + step % 2)}))
    assert engine.alerts == []
    # rounding noise around the limit: the bias's own weight still learns, so nothing vanished
    engine = AlertEngine(warn=False)
    for step in range(20):
        bias = 2e-6 if step < 5 else 3e-7
        engine.observe(layer_rows(step, weight=0.1, bias=bias))
    assert engine.alerts == []
    # the whole layer vanishing is still reported, on its weight and on its bias
    engine = AlertEngine(warn=False)
    for step in range(20):
        low = 1.0 if step < 5 else 1e-9
        engine.observe(layer_rows(step, weight=low, bias=low))
    assert [(a.kind, a.step, a.param) for a in engine.alerts] == [
        ("vanishing_grad", 7, "conv.weight"),
        ("vanishing_grad", 7, "conv.bias"),
    ]


def test_batchnorm_fed_bias_raises_no_alert_in_a_real_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Analyzer(net, tmp_path) as analyzer:
            analyzer.attach(optimizer)
            for _ in range(8):
                loss = F.cross_entropy(net(torch.randn(16, 1, 6, 6)), torch.randint(0, 3, (16,)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            grad = net[0].bias.grad
            assert grad is not None and float(grad.norm()) < 1e-6 * float(net[0].weight.grad.norm())
    assert analyzer.alerts is not None and analyzer.alerts.alerts == []
    assert not [w for w in caught if issubclass(w.category, AlertWarning)]


def test_dead_rule_thresholds_and_nonfinite_switch() -> None:
    engine = AlertEngine(AlertConfig(dead_rise=0.3, nonfinite=True), warn=False)
    for step, fraction in enumerate([0.1, 0.05, 0.3, 0.34, 0.36, 0.1, 0.5]):
        engine.observe([(step, step, 3, "relu", "", "dead_fraction", fraction)])
    assert [(a.kind, a.step) for a in engine.alerts] == [("dead_units_rising", 4), ("dead_units_rising", 6)]
    engine.observe([(7, 0, 1, "fc", "fc.weight", "l2", math.nan)])
    assert engine.alerts[-1].kind == "nonfinite_grad" and engine.alerts[-1].step == 7
    with pytest.raises(ValueError, match="explode_factor"):
        AlertConfig(explode_factor=0.5)


def test_warning_once_per_kind() -> None:
    engine = AlertEngine(AlertConfig(explode_min_history=1, explode_window=1, explode_floor=0))
    with pytest.warns(AlertWarning, match="exploding gradient at step 1") as record:
        for step, value in enumerate([1.0, 100.0, 1.0, 100.0, 1e4]):
            engine.observe(rows(step, {"w": value}))
    assert len([w for w in record if issubclass(w.category, AlertWarning)]) == 1
    assert [a.step for a in engine.alerts] == [1, 3]  # step 4 continues the anomaly of step 3
