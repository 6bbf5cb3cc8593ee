"""The training monitor: every statistic against an independent float64 oracle, the model
untouched, bit-identical training, dead units, saturation, NaN attribution, AMP, bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.hooks import count_hooks
from bbdecoder.monitor import (
    Analyzer,
    EmptyEpochError,
    Master_analyzer,
    NonFiniteGradientWarning,
    channel_similarity,
)
from bbdecoder.monitor.host_copy import HostCopy
from bbdecoder.store import open_run


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.tanh = nn.Tanh()
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu(self.bn(self.conv(x))), 2)
        return self.fc2(self.tanh(self.fc1(self.drop(torch.flatten(x, 1)))))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def oracle_grad_stats(g: torch.Tensor) -> dict[str, float]:
    g = g.detach().double().flatten()
    return {
        "mean": g.mean().item(),
        "mean_abs": g.abs().mean().item(),
        "max_abs": g.abs().max().item(),
        "var": ((g - g.mean()) ** 2).mean().item(),
        "l1": g.abs().sum().item(),
        "l2": g.pow(2).sum().sqrt().item(),
    }


def train_seed_interface(tmp_path, steps_per_epoch: int = 3, epochs: int = 2):
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = Master_analyzer(model, tmp_path / "run", input_size=(1, 3, 8, 8))
    expected, weights_before, weights_after = [], [], []
    data = batches(steps_per_epoch * epochs)
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            x, y = data[epoch * steps_per_epoch + i]
            loss = F.cross_entropy(wrapped.forward_propagation(x), y)
            opt.zero_grad()
            wrapped.backward_propagation(loss, collect_grads=True, layer_inds=[0, 1, 4, 6])
            expected.append({n: oracle_grad_stats(p.grad) for n, p in model.named_parameters()})
            weights_before.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
            opt.step()
            weights_after.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        wrapped.save_collected_grads(tmp_path / "figs", ep=epoch)
    wrapped.close()
    return model, expected, weights_before, weights_after


def test_grad_stats_and_epoch_aggregates_match_float64_oracle(tmp_path):
    _model, expected, before, after = train_seed_interface(tmp_path)
    run = open_run(tmp_path / "run")
    sc = run.scalars()
    assert list(sc.columns) == ["step", "epoch", "layer_id", "layer", "param", "stat", "value"]
    grads = sc[sc.stat.isin(["mean", "mean_abs", "max_abs", "var", "l1", "l2"])]
    assert set(grads.param) == {
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }
    assert set(grads.layer_id) == {0, 1, 4, 6}
    assert len(grads) == 6 * 8 * 6  # steps x params x stats
    for row in grads.itertuples():
        oracle = expected[row.step][row.param]
        # float32 reductions: a mean close to 0 is exact up to rounding on the scale of mean |g|
        tol = 1e-6 * oracle["mean_abs"] if row.stat == "mean" else 1e-12
        where = (row.step, row.param, row.stat)
        assert row.value == pytest.approx(oracle[row.stat], rel=2e-5, abs=tol), where
    # per-epoch mean and population variance across iterations, from the oracle values
    ep = run.epoch_scalars()
    for row in ep.itertuples():
        vals = np.array([expected[s][row.param][row.stat] for s in range(row.epoch * 3, row.epoch * 3 + 3)])
        want = vals.mean() if row.agg == "mean" else vals.var()
        scale = np.mean([expected[s][row.param]["mean_abs"] for s in range(row.epoch * 3, row.epoch * 3 + 3)])
        tol = (1e-6 * scale) ** (1 if row.agg == "mean" else 2) if row.stat == "mean" else 1e-14
        where = (row.epoch, row.param, row.stat, row.agg)
        assert row.value == pytest.approx(want, rel=1e-4, abs=tol), where
    # update ratio ||W_after - W_before|| / ||W_before|| of every step's optimizer.step(), the
    # absolute ||W_after - W_before|| where W_before is zero (bn.bias at step 0): never inf
    ur = sc[sc.stat == "update_ratio"]
    assert sorted(set(ur.step)) == list(range(6))
    assert np.isfinite(ur.value).all()
    for row in ur.itertuples():
        b, a = before[row.step][row.param], after[row.step][row.param]
        want = (a - b).norm() / b.norm() if b.norm() > 0 else (a - b).norm()
        assert row.value == pytest.approx(want.item(), rel=1e-4)
    assert run.steps()["epoch"].tolist() == [0, 0, 0, 1, 1, 1]


def test_weight_histograms_and_quantiles_match_numpy(tmp_path):
    model, *_ = train_seed_interface(tmp_path, steps_per_epoch=2, epochs=2)
    run = open_run(tmp_path / "run")
    w = model.fc1.weight.detach().double().numpy().ravel()  # weights after the last epoch
    sc = run.scalars()
    last = sc[(sc.epoch == 1) & (sc.param == "fc1.weight")].set_index("stat")["value"]
    for q, name in [(0.01, "weight_q01"), (0.25, "weight_q25"), (0.5, "weight_q50"), (0.99, "weight_q99")]:
        assert last[name] == pytest.approx(np.quantile(w, q), rel=1e-6)
    assert last["weight_mean"] == pytest.approx(w.mean(), rel=1e-6, abs=1e-9)
    assert last["weight_std"] == pytest.approx(w.std(), rel=1e-6)
    assert last["weight_l2"] == pytest.approx(np.linalg.norm(w), rel=1e-6)
    hist = run.histograms("weight")
    h = hist[(hist.param == "fc1.weight")]
    assert sorted(set(h.epoch)) == [0, 1]
    h1 = h[h.epoch == 1]
    edges = np.append(h1["left"].to_numpy(), h1["right"].iloc[-1])
    assert np.allclose(h[h.epoch == 0]["left"].to_numpy(), h1["left"].to_numpy())  # fixed bins
    clipped = np.clip(w, edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    assert h1["count"].sum() == w.size
    assert np.abs(h1["count"].to_numpy() - counts).sum() <= 2  # float32 vs float64 bin boundaries


def test_model_untouched_and_no_hooks_after_close(tmp_path):
    torch.manual_seed(0)
    model = SmallNet().train()
    model.fc1.requires_grad_(False)
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    an = Analyzer(model, tmp_path, input_size=(2, 3, 8, 8), activations=True)
    assert count_hooks(model) > 0
    an.summary(print_table=False)
    an.function_graph(torch.randn(2, 3, 8, 8))
    an.get_sim(torch.randn(2, 3, 8, 8), "conv")
    an.close()
    assert count_hooks(model) == 0
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert not model.fc1.weight.requires_grad and model.conv.weight.requires_grad
    after = model.state_dict()
    assert list(after) == list(state)
    for k in state:
        assert torch.equal(after[k], state[k]), k


def _train(monitor: str, tmp_path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    an = None
    if monitor == "seed":
        an = Analyzer(model, tmp_path / "a", activations=True)
    elif monitor == "attach":
        an = Analyzer(model, tmp_path / "b", activations=["relu", "tanh"]).attach(opt)
    for epoch in range(2):
        for x, y in batches(3, seed=epoch):
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            if monitor == "seed":
                an.backward_propagation(loss)  # type: ignore[union-attr]
            else:
                loss.backward()
            opt.step()
        if an is not None:
            an.end_epoch()
    if an is not None:
        an.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_bit_identical_with_and_without_analyzer(tmp_path):
    plain = _train("none", tmp_path)
    for mode in ("seed", "attach"):
        watched = _train(mode, tmp_path)
        assert list(watched) == list(plain)
        for k in plain:
            assert torch.equal(watched[k], plain[k]), (mode, k)
    sc = open_run(tmp_path / "b").scalars()
    assert sorted(set(sc.step)) == list(range(6))  # attach: one record per optimizer.step()


def test_planted_dead_channels_found_and_pruned(tmp_path):
    torch.manual_seed(0)
    dead = [1, 4]
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
    )
    with torch.no_grad():
        model[0].bias[dead] = -100.0
    x = torch.rand(32, 3, 8, 8)
    y = torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    an = Analyzer(model, tmp_path, activations=[1])  # watch the ReLU
    for i in range(4):
        loss = F.cross_entropy(an.forward_propagation(x[i * 8 : (i + 1) * 8]), y[i * 8 : (i + 1) * 8])
        opt.zero_grad()
        an.backward_propagation(loss)
        opt.step()
    assert an.dead_units() == {"1": dead}

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    with torch.no_grad():
        logits_before = model(x)
    report = an.prune_dead(evaluate=accuracy)
    assert [(e.layer, e.channels, e.pruned_module, e.pruned_params) for e in report.entries] == [
        ("1", dead, "0", ["weight", "bias"])
    ]
    assert report.total == 2 and report.accuracy_before == report.accuracy_after
    with torch.no_grad():
        assert torch.equal(model(x), logits_before)  # dead units contribute nothing either way
        assert (model[0].weight[dead] == 0).all() and (model[0].bias[dead] == 0).all()
    # the optimizer keeps working on the same parameters; masked entries stay zero
    loss = F.cross_entropy(an.forward_propagation(x[:8]), y[:8])
    opt.zero_grad()
    an.backward_propagation(loss)
    opt.step()
    assert (model[0].weight[dead] == 0).all()
    assert "0.weight_mask" in model.state_dict()
    an.make_pruning_permanent()
    assert "0.weight_mask" not in model.state_dict() and "0.weight" in model.state_dict()
    an.close()
    assert count_hooks(model) == 0
    run = open_run(tmp_path)
    assert run.events("prune")["data"][0]["entries"][0]["channels"] == dead
    assert run.events("dead_units")["data"].iloc[-1]["channels"] == dead
    df = run.scalars("dead_fraction")
    assert df["value"].iloc[0] == pytest.approx(2 / 6)


def test_dead_fraction_saturation_and_channel_var_match_oracle(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Sigmoid(), nn.Linear(10, 3))
    with torch.no_grad():
        model[0].weight.mul_(400.0)  # drive the sigmoid into saturation
    an = Analyzer(model, tmp_path, activations=[0, 1], saturation_eps=1e-3)
    outs0, outs1 = [], []
    model[0].register_forward_hook(lambda m, i, o: outs0.append(o.detach().double()))
    model[1].register_forward_hook(lambda m, i, o: outs1.append(o.detach().double()))
    for _ in range(3):
        loss = an.forward_propagation(torch.randn(16, 4)).pow(2).mean()
        an.backward_propagation(loss)
    an.end_epoch()
    an.close()
    sc = open_run(tmp_path).scalars().set_index(["layer", "stat"])["value"]
    s = torch.cat(outs1)
    sat = ((s < 1e-3) | (s > 1 - 1e-3)).double().mean().item()
    assert sat > 0.9
    assert sc[("1", "saturated_fraction")] == pytest.approx(sat)
    lin = torch.cat(outs0)
    assert sc[("0", "dead_fraction")] == pytest.approx((lin.amax(0) <= 0).double().mean().item())
    assert np.isnan(sc[("0", "saturated_fraction")])  # Linear has no saturation test
    cvar = np.mean([o.mean(0).var(unbiased=False).item() for o in outs1])
    assert sc[("1", "channel_var")] == pytest.approx(cvar, rel=1e-5)


def test_get_sim_matches_cosine_oracle(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    with Analyzer(model, tmp_path) as an:
        sim = an.get_sim(x, "conv")
    act = model.eval().conv(x).detach().double().transpose(0, 1).reshape(6, -1)
    want = F.cosine_similarity(act[:, None, :], act[None, :, :], dim=2)
    assert torch.allclose(sim, want, atol=1e-10)
    assert torch.allclose(channel_similarity(torch.ones(2, 3)), torch.ones(3, 3, dtype=torch.float64))


class PoisonGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * float("nan")


class Poisoned(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PoisonGrad.apply(x)


def test_nan_in_one_layers_backward_is_attributed_to_it(tmp_path):
    torch.manual_seed(0)
    # NaN enters the backward pass at the output of layer 2: layers 2 and 0 get NaN gradients,
    # layer 5 stays finite; the first non-finite layer in backward order is layer 2.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), Poisoned(), nn.ReLU(), nn.Linear(8, 2))
    an = Analyzer(model, tmp_path)
    loss = an.forward_propagation(torch.randn(5, 4)).sum()
    pattern = r"first in backward order is layer \[2\] 2 \(2\.(weight|bias)\)"
    with pytest.warns(NonFiniteGradientWarning, match=pattern):
        an.backward_propagation(loss)
    an.close()
    ev = open_run(tmp_path).events("nonfinite_grad")
    assert ev["layer_id"].tolist() == [2] and ev["param"][0] in {"2.weight", "2.bias"}
    assert set(ev["data"][0]["affected"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_amp_grad_scaler_statistics_are_unscaled(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    an = Analyzer(model, tmp_path, scaler=scaler)
    expected = []
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,)))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        expected.append({n: oracle_grad_stats(p.grad.double() / scale) for n, p in model.named_parameters()})
        an.step()
        scaler.step(opt)
        scaler.update()
    an.close()
    sc = open_run(tmp_path).scalars()
    sc = sc[sc.stat.isin(["mean", "mean_abs", "max_abs", "var", "l1", "l2"])]
    assert len(sc) == 2 * 4 * 6
    for row in sc.itertuples():
        oracle = expected[row.step][row.param]
        tol = 1e-6 * oracle["mean_abs"] if row.stat == "mean" else 1e-14
        assert row.value == pytest.approx(oracle[row.stat], rel=1e-5, abs=tol)


def test_bad_input_gives_clear_errors_and_keeps_stored_data(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    an = Analyzer(model, tmp_path)
    x, y = batches(1)[0]
    loss = F.cross_entropy(an.forward_propagation(x), y)
    an.backward_propagation(loss, layers=["conv", "fc2"])
    an.end_epoch()
    stored = len(open_run(tmp_path).scalars())

    loss = F.cross_entropy(an.forward_propagation(x), y)
    with pytest.raises(IndexError, match="layer ID 99 does not exist"):
        an.backward_propagation(loss, layer_inds=[0, 99])
    with pytest.raises(KeyError, match="no leaf layer is named 'fc'; did you mean"):
        an.backward_propagation(loss, layers=["fc"])
    with pytest.raises(ValueError, match="loss must be a scalar"):
        an.backward_propagation(F.cross_entropy(an.forward_propagation(x), y, reduction="none"))
    an.backward_propagation(loss)  # the graph survived the failed calls
    with pytest.raises(RuntimeError, match="already called on this loss"):
        an.backward_propagation(loss)
    with pytest.raises(RuntimeError, match="no gradient was computed"):
        an.step()
    an.end_epoch()
    with pytest.raises(EmptyEpochError, match="epoch 2 has no recorded steps"):
        an.save_collected_grads(tmp_path / "figs", ep=2)
    with pytest.raises(ValueError, match="not both"):
        an.backward_propagation(loss, layer_inds=[0], layers=[1])
    an.close()
    with pytest.raises(RuntimeError, match="closed"):
        an.step()
    run = open_run(tmp_path)
    assert len(run.scalars()) > stored and run.steps()["step"].tolist() == [0, 1]
    assert run.integrity_check() == "ok"


def test_summary_function_graph_and_activation_curves(tmp_path, capsys):
    torch.manual_seed(0)
    model = SmallNet()
    an = Analyzer(model, tmp_path, input_size=(1, 3, 8, 8))
    table = an.summary()
    assert "conv" in capsys.readouterr().out
    assert "[1, 6, 8, 8]" in table and "[1, 5]" in table and "Dropout" in table
    graph = an.function_graph(torch.randn(1, 3, 8, 8), save_folder=tmp_path / "g")
    labels = [n.label for n in graph.nodes]
    assert labels == [
        "input",
        "conv (Conv2d)",
        "bn (BatchNorm2d)",
        "relu (ReLU)",
        "max_pool2d",
        "flatten",
        "drop (Dropout)",
        "fc1 (Linear)",
        "tanh (Tanh)",
        "fc2 (Linear)",
    ]
    assert graph.edges == [(i, i + 1) for i in range(9)]
    assert graph.to_dot().startswith("digraph") and (tmp_path / "g" / "function_graph.png").exists()
    assert (tmp_path / "g" / "activation_curves.png").exists()
    an.close()
    assert open_run(tmp_path).artifact("graph.txt") == graph.to_text()


def test_residual_graph_and_curves():
    from bbdecoder.monitor import activation_curves, trace_graph

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.b(F.relu(self.a(x))) + x)

    model = Res()
    graph = trace_graph(model, torch.randn(2, 4))
    names = [n.name for n in graph.nodes]
    assert names == ["input", "a", "relu", "b", "add", "sigmoid"]
    assert graph.nodes[4].inputs == [0, 3]  # the residual add reads the input and b's output
    curves = activation_curves(nn.Sequential(nn.ReLU(), nn.Tanh()), graph=graph)
    x, y = curves["ReLU()"]
    assert np.allclose(y, np.maximum(x, 0)) and np.allclose(curves["Tanh()"][1], np.tanh(x), atol=1e-6)
    assert np.allclose(curves["F.sigmoid"][1], 1 / (1 + np.exp(-x)), atol=1e-6)


def test_figures_from_store_have_epoch_in_name(tmp_path):
    from bbdecoder.viz.monitor_plots import plot_activation_fractions, plot_gradient_flow, value_limits

    train_seed_interface(tmp_path, steps_per_epoch=2, epochs=2)
    figs = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert figs == [
        "grad_flow_ep000.png",
        "grad_flow_ep001.png",
        "grad_norms_ep000.png",
        "grad_norms_ep001.png",
    ]
    assert plot_gradient_flow(tmp_path / "run", tmp_path / "f", 1, scale="auto").name == "grad_flow_ep001.png"
    vals = np.array([1e-9, 3.0, 0.0, np.nan])
    lo, hi = value_limits(vals, log=True)  # type: ignore[misc]
    assert lo < 1e-9 and hi > 3.0
    lo, hi = value_limits(np.array([-2.0, 5.0]), log=False)  # type: ignore[misc]
    assert lo < -2.0 and hi > 5.0
    with pytest.raises(ValueError, match="no activation statistics"):
        plot_activation_fractions(tmp_path / "run", tmp_path / "f")
    with pytest.raises(ValueError, match="epoch 7"):
        plot_gradient_flow(tmp_path / "run", tmp_path / "f", 7)


def test_visualize_weight_hist_and_activation_figure(tmp_path):
    from bbdecoder.viz.monitor_plots import plot_activation_fractions

    torch.manual_seed(0)
    model = SmallNet()
    an = Analyzer(model, tmp_path, activations=["relu", "tanh"])
    paths = an.visualize_weight_hist(tmp_path / "w", layer_inds=[0])  # before training: snapshot
    assert [p.name for p in paths] == ["weight_hist_conv.weight_ep000.png", "weight_hist_conv.bias_ep000.png"]
    for epoch in range(2):
        for x, y in batches(2, seed=epoch):
            an.backward_propagation(F.cross_entropy(an.forward_propagation(x), y))
        an.end_epoch(epoch)
    paths = an.visualize_weight_hist(tmp_path / "w", layers="fc2", style="ridge")
    assert [p.name for p in paths] == ["weight_hist_fc2.weight_ep001.png", "weight_hist_fc2.bias_ep001.png"]
    an.close()
    assert plot_activation_fractions(tmp_path, tmp_path / "w").name == "activations_ep001.png"
    sc = open_run(tmp_path).scalars("saturated_fraction")
    assert set(sc.layer) == {"relu", "tanh"} and len(sc) == 4


def test_warnings_free_normal_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_seed_interface(tmp_path, steps_per_epoch=1, epochs=1)
    assert isinstance(open_run(tmp_path / "run").scalars(), pd.DataFrame)


@pytest.mark.parametrize("deferred", [False, True])
def test_one_host_copy_per_step(tmp_path, monkeypatch, deferred):
    """No tensor is read into Python inside step(): on CPU the statistics stay in NumPy and the loss
    is the one number read (``float``); with the deferred copy of CUDA (run here on CPU) nothing is
    read at all: the vector is copied into a host buffer and read a step later."""
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    an = Analyzer(model, tmp_path)
    if deferred:
        an._host = HostCopy(deferred=True)
    calls = {"cpu": 0, "item": 0, "tolist": 0, "float": 0}
    for name in calls:
        attr = "__float__" if name == "float" else name
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _orig=original, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    expected = {"cpu": 0, "item": 0, "tolist": 0, "float": 0 if deferred else 1}
    for x, y in batches(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = dict(calls)
        an.step(loss=loss)
        assert {k: calls[k] - before[k] for k in calls} == expected
        opt.step()
    monkeypatch.undo()
    an.close()
    assert len(open_run(tmp_path).scalars("update_ratio")) == 3 * 8


def test_context_manager_cleans_up_when_training_raises(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    with pytest.raises(ZeroDivisionError), Analyzer(model, tmp_path, activations=True) as an:
        x, y = batches(1)[0]
        an.backward_propagation(F.cross_entropy(an.forward_propagation(x), y))
        _ = 1 / 0
    assert count_hooks(model) == 0 and an.closed
    run = open_run(tmp_path)
    assert run.steps()["step"].tolist() == [0] and run.epochs() == [0]
    assert len(run.epoch_scalars()) == 8 * 6 * 2  # the open epoch was finished on close


def test_diverged_weights_do_not_crash_the_epoch_end(tmp_path) -> None:
    from bbdecoder.monitor import Analyzer
    from bbdecoder.monitor.weights import fixed_range, histogram

    weight = torch.tensor([float("nan"), float("inf"), -2.0, 0.5, 1.0])
    lo, hi = fixed_range(weight)
    assert (lo, hi) == (-3.0, 3.0)
    counts = histogram(weight, lo, hi, 6)
    assert counts.sum() == 4 and counts[-1] == 1  # NaN left out, +inf in the last bin
    model = nn.Linear(3, 2)
    with Analyzer(model, tmp_path) as analyzer:
        F.mse_loss(analyzer.forward_propagation(torch.randn(4, 3)), torch.zeros(4, 2)).backward()
        analyzer.step()
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
        analyzer.end_epoch()  # histograms and quantiles of a diverged weight: no crash


def test_activations_none_watches_nothing(tmp_path) -> None:
    from bbdecoder.monitor import Analyzer

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with Analyzer(model, tmp_path, activations=None):
        assert count_hooks(model) == 0
    with Analyzer(model, tmp_path / "all", activations=True):
        assert count_hooks(model) > 0
