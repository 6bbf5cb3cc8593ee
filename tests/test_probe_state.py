"""Probes declare their state and its reduction; RankSync merges any such probe across 2 spawned gloo
ranks, generically (a probe of the test's own, and the activation probes, in one call)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bbdecoder.integrations.ddp import RankSync
from bbdecoder.monitor.activations import ActivationProbe
from bbdecoder.monitor.probe_state import ACTIVATION_STATE, StatefulProbe

from .test_ddp import STORE_HOST, run_ranks

WORLD = 2


class RangeProbe(StatefulProbe):
    """A probe that is none of the monitor's: one state tensor per reduction kind."""

    STATE: ClassVar[dict[str, str]] = {
        "low": "min",
        "high": "max",
        "total": "sum",
        "average": "mean",
        "seen": "cat",
        "unused": "sum",
    }

    def __init__(self, rank: int) -> None:
        r = float(rank)
        self.low = torch.tensor([r, -r, 5.0])
        self.high = torch.tensor([[r, 10 - r], [-r, 0.5]])
        self.total = torch.tensor(r + 1, dtype=torch.float64)
        self.average = torch.tensor([2 * r, 1.0])
        self.seen = torch.arange(rank + 1, dtype=torch.float32) + 10 * rank  # sizes differ per rank
        self.unused = None  # not allocated: left out, on every rank alike


def _activation_probe(rank: int) -> ActivationProbe:
    probe = ActivationProbe(nn.ReLU(), 0.0, 1e-3, 1, dead=True)
    out = torch.zeros(4, 3)
    out[:, rank] = 1.0 + rank  # channel 0 fires on rank 0 only, channel 1 on rank 1, channel 2 never
    probe.update(out)
    return probe


def _merge_worker(rank: int, world: int, store_port: int, save_path: str) -> None:
    torch.set_num_threads(1)
    deadline = timedelta(minutes=8)
    store = dist.TCPStore(STORE_HOST, store_port, is_master=False, timeout=deadline)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=deadline)
    try:
        probe, activation = RangeProbe(rank), _activation_probe(rank)
        low_before = probe.low
        RankSync().reduce_probes([probe, activation])
        assert probe.low is low_before  # merged in place where the shape is kept
        state = {f"range.{k}": v for k, v in probe.state_tensors().items()}
        state |= {f"act.{k}": v for k, v in activation.state_tensors().items()}
        torch.save(state, Path(save_path) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("probe_state")
    run_ranks(WORLD, folder, _merge_worker)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_declared_state_merges_by_its_reductions_on_every_rank(merged: list[dict[str, torch.Tensor]]) -> None:
    ranks = [RangeProbe(r) for r in range(WORLD)]  # the oracle: each rank's state, reduced here
    want = {
        "range.low": torch.stack([p.low for p in ranks]).amin(0),
        "range.high": torch.stack([p.high for p in ranks]).amax(0),
        "range.total": torch.stack([p.total for p in ranks]).sum(0),
        "range.average": torch.stack([p.average for p in ranks]).mean(0),
        "range.seen": torch.cat([p.seen for p in ranks]),
    }
    for state in merged:
        assert "range.unused" not in state
        for key, value in want.items():
            assert state[key].dtype == value.dtype, key
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_activation_probes_merge_through_the_same_path(merged: list[dict[str, torch.Tensor]]) -> None:
    assert ActivationProbe.STATE == ACTIVATION_STATE
    for state in merged:
        torch.testing.assert_close(
            state["act.max"], torch.tensor([1.0, 2.0, 0.0])
        )  # channel 2 dead everywhere
        assert float(state["act.forwards"]) == WORLD
        assert float(state["act.total"]) == WORLD * 12  # every rank's ReLU elements
        assert float(state["act.saturated"]) == WORLD * 12 - 4 - 4  # zeros of both ranks


def test_a_single_process_merge_is_a_no_op_and_bad_reductions_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown reductions"):

        class Bad(StatefulProbe):
            STATE: ClassVar[dict[str, str]] = {"x": "median"}

    from bbdecoder.monitor.probe_state import merge_states

    probe = RangeProbe(3)
    calls: list[str] = []

    def all_reduce(flat: torch.Tensor, op: str) -> torch.Tensor:
        calls.append(op)
        return flat

    merge_states([probe], all_reduce, lambda t: [t], world_size=1)
    assert sorted(calls) == ["max", "min", "sum", "sum"]  # one collective per kind: mean goes as sum
    torch.testing.assert_close(probe.seen, RangeProbe(3).seen)
    torch.testing.assert_close(probe.average, RangeProbe(3).average)
