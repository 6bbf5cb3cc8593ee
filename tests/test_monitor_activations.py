"""Activation probes: dead units over every batch and every rank, statistics only where they mean
something, units along the right dim, and torch.compile without recompiles or lost hooks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.monitor.activations import ActivationProbe
from bbdecoder.store import open_run


def _gate() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(1, 3, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0], [-1.0], [0.0]]))
    return model


def test_a_unit_firing_in_one_batch_only_is_not_dead(tmp_path) -> None:
    # unit 0 fires for one sample of the middle batch only; unit 2 never fires; unit 1 always
    model = _gate()
    batches = [
        torch.full((4, 1), -1.0),
        torch.tensor([[-1.0], [2.0], [-1.0], [-1.0]]),
        torch.full((4, 1), -1.0),
    ]
    with Analyzer(model, tmp_path, activations=True) as an:
        for x in batches:
            an.forward_propagation(x).sum().backward()
            an.step()
        assert an.dead_units() == {"1": [2]}
        an.end_epoch()
    events = open_run(tmp_path).events("dead_units")
    assert events["data"].iloc[0]["channels"] == [2]
    assert open_run(tmp_path).scalars("dead_count")["value"].tolist() == [1.0]


def _probe_on(batches: list[torch.Tensor]) -> ActivationProbe:
    probe = ActivationProbe(nn.ReLU(), 0.0, 1e-3, -1, dead=True)
    for x in batches:
        probe.update(_gate()(x))
    return probe


def test_a_unit_firing_on_one_rank_only_is_not_dead(monkeypatch) -> None:
    import torch.distributed as dist

    from bbdecoder.integrations import ddp

    rank0 = {1: _probe_on([torch.full((4, 1), -1.0)])}  # unit 0 silent here
    rank1 = {1: _probe_on([torch.full((4, 1), -1.0), torch.tensor([[3.0], [-1.0]])])}  # unit 0 fires here
    sync = object.__new__(ddp.RankSync)
    sync.group, sync.rank, sync.world_size, sync.writer_rank, sync._nccl = None, 0, 2, 0, False
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: sent.append(t.clone()))
    sync.reduce_activations(rank1)  # what rank 1 contributes to each all_reduce
    contributions = list(sent)

    def all_reduce(tensor: torch.Tensor, op=None, group=None) -> None:
        other = contributions.pop(0)
        if op == dist.ReduceOp.MAX:
            torch.maximum(tensor, other, out=tensor)
        elif op == dist.ReduceOp.MIN:
            torch.minimum(tensor, other, out=tensor)
        else:
            tensor.add_(other)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    sync.reduce_activations(rank0)
    merged = rank0[1]
    assert merged.dead_mask().tolist() == [False, False, True]  # dead only where dead on every rank
    assert float(merged.forwards) == 3.0 and float(merged.total) == 4 * 3 + 4 * 3 + 2 * 3


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(4, 6)
        self.tanh = nn.Tanh()
        self.logits = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.relu(self.conv(x))).mean((2, 3))
        return self.logits(self.tanh(self.fc(h)))


def test_activations_true_watches_activation_functions_and_counts_dead_only_on_rectifiers(tmp_path) -> None:
    torch.manual_seed(0)
    model = Mixed()
    with Analyzer(model, tmp_path, activations=True) as an:
        F.cross_entropy(
            an.forward_propagation(torch.randn(4, 2, 5, 5)), torch.tensor([0, 1, 2, 0])
        ).backward()
        an.step()
    sc = open_run(tmp_path).scalars()
    act = sc[sc.stat.isin(["dead_fraction", "saturated_fraction", "channel_var"])]
    assert set(act.layer) == {"relu", "tanh"}  # not the logits, not Dropout
    assert set(act[act.stat == "dead_fraction"].layer) == {"relu"}  # a Tanh has no dead regime
    assert set(act[act.stat == "saturated_fraction"].layer) == {"relu", "tanh"}


def test_units_are_the_last_dim_of_token_outputs(tmp_path) -> None:
    # (N, L, D) outputs: the units are the D features, not the L positions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias[[1, 3]] = -100.0  # features 1 and 3 never fire
    x = torch.randn(2, 7, 5)  # 7 positions
    with Analyzer(model, tmp_path, activations=True) as an:
        an.forward_propagation(x).sum().backward()
        an.step()
        assert an.dead_units() == {"1": [1, 3]}
    with Analyzer(model, tmp_path / "conv", activations=[1], channel_dim=1) as an:
        an.forward_propagation(x).sum().backward()
        an.step()
        assert len(an._activations.probes[1].max) == 7  # what the user asked for


def _compiled_run(path, compiled: bool, steps: int = 5, every: int = 1):
    torch.manual_seed(0)
    model = Mixed()
    runner = torch.compile(model, backend="eager") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [(torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))) for _ in range(steps)]
    frames = []
    with Analyzer(runner, path, activations=True, every=every) as an:
        for i, (x, y) in enumerate(data):
            loss = F.cross_entropy(an.forward_propagation(x), y)
            opt.zero_grad()
            an.backward_propagation(loss)
            opt.step()
            if i == min(every, 2) - 1:  # a recorded and (every > 1) a skipped step have run
                frames.append(_frames_compiled())
            if i == 2:
                an.end_epoch()
        frames.append(_frames_compiled())
    return open_run(path).scalars(), frames, model


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["frames"].values())) + int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("every", [1, 2])
def test_compiled_model_records_the_same_numbers_without_recompiling(tmp_path, every) -> None:
    # every=2: one graph with the probes, one for the skipped steps' forwards, then no more
    torch._dynamo.reset()
    eager, _, _ = _compiled_run(tmp_path / "eager", compiled=False, every=every)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled, frames, _ = _compiled_run(tmp_path / "compiled", compiled=True, every=every)
    assert frames[1] == frames[0], "recompiled after the first steps"
    act = compiled[compiled.stat.isin(["dead_fraction", "saturated_fraction", "channel_var"])]
    assert not act.empty and set(act.layer) == {"relu", "tanh"}
    merged = eager.merge(compiled, on=["step", "epoch", "param", "layer", "stat"], suffixes=("_e", "_c"))
    assert len(merged) == len(eager) == len(compiled)
    np.testing.assert_allclose(merged.value_c, merged.value_e, rtol=1e-6, atol=1e-12)


def test_every_watches_the_forwards_of_the_recorded_steps_only(tmp_path) -> None:
    # oracle: a monitor recording every step, fed only the batches of the steps every=2 records
    # (no optimizer: the same weights for every batch); unit 0 fires in the odd batches only
    batches = [torch.tensor([[-1.0], [-2.0]]), torch.tensor([[3.0], [-1.0]])] * 3
    stats = ["dead_fraction", "dead_count", "channel_var"]

    def run(path, every: int, xs: list[torch.Tensor]):
        with Analyzer(_gate(), path, activations=True, every=every) as an:
            for x in xs:
                an.forward_propagation(x).sum().backward()
                an.step()
            assert an._activations.forwards_seen() == len(xs) // every
            dead = an.dead_units()
            an.end_epoch()
        table = open_run(path).scalars()
        return dead, table[table.stat.isin(stats)].set_index(["layer", "stat"]).value.sort_index()

    sampled_dead, sampled = run(tmp_path / "every2", 2, batches)
    oracle_dead, oracle = run(tmp_path / "oracle", 1, batches[::2])
    _, every_batch = run(tmp_path / "all", 1, batches)
    assert sampled_dead == oracle_dead == {"1": [0, 2]}
    assert len(sampled) == 3
    np.testing.assert_array_equal(sampled.to_numpy(), oracle.to_numpy())
    assert every_batch.loc[("1", "dead_count")] == 1.0  # seen in every batch, unit 0 fires


def test_a_class_compiled_earlier_does_not_silently_lose_the_hooks(tmp_path) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    first = torch.compile(Mixed(), backend="eager")
    first(torch.randn(2, 2, 5, 5))  # the class's forward compiled before any hook existed
    runner = torch.compile(Mixed(), backend="eager")
    runner(torch.randn(2, 2, 5, 5))
    with Analyzer(runner, tmp_path, activations=True) as an:
        an.forward_propagation(torch.randn(4, 2, 5, 5)).sum().backward()
        seen = an._activations.forwards_seen()
        if seen == 0:  # dynamo reused the hook-free graph: the user is told
            with pytest.warns(RuntimeWarning, match="activation hooks recorded nothing"):
                an.step()
        else:  # torch 2.13 guards on the hooks and recompiles
            an.step()
    if seen:  # then the rows must be there
        assert set(open_run(tmp_path).scalars("channel_var").layer) == {"relu", "tanh"}
    torch._dynamo.reset()


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.ReLU()  # declared, never called (F.relu is used)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


def test_hooks_that_never_fire_are_reported_once(tmp_path) -> None:
    with Analyzer(Unused(), tmp_path, activations=True) as an:
        for _ in range(2):
            an.forward_propagation(torch.randn(2, 3)).sum().backward()
            if _ == 0:
                with pytest.warns(RuntimeWarning, match="activation hooks recorded nothing"):
                    an.step()
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    an.step()  # once is enough


@pytest.mark.parametrize(
    "module",
    [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5), nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(), nn.GELU()],
)
def test_saturation_count_equals_the_boolean_rule(module) -> None:
    from bbdecoder.monitor.activations import saturation_count, saturation_test

    torch.manual_seed(0)
    y = module(torch.randn(4, 3, 50) * 8)
    count, mask = saturation_count(module, 1e-3), saturation_test(module, 1e-3)
    if mask is None:
        assert count is None
        return
    assert 0 < mask(y).sum().item() < y.numel()
    assert count(y).item() == mask(y).sum().item()
