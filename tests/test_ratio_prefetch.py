"""Update ratios measured on the writer thread after ``optimizer.step()`` (monitor.ratio_prefetch):
the same numbers as the inline pass, to the bit, and a float64 oracle; the pass dropped and redone
inline where the weights changed after the optimizer's step (in place, replaced, a second
optimizer); training unchanged; the global optimizer hook removed with the analyzer."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks

from bbdecoder.monitor import Analyzer, ratio_prefetch
from bbdecoder.monitor.ratio_prefetch import spare_core
from bbdecoder.store import open_run

STEPS = 6
Between = Callable[[nn.Module, int], None]


@pytest.fixture(autouse=True)
def _spare_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass starts whatever the machine (CI runs torch with as many threads as cores)."""
    monkeypatch.setattr(ratio_prefetch, "spare_core", lambda: True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 300),
        nn.Linear(300, 3),
    )
    with torch.no_grad():
        model[5].bias.zero_()  # a zero weight: the absolute update
    return model.to(memory_format=torch.channels_last)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 2, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _train(
    model: nn.Module,
    path: Path | None,
    *,
    optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]] | None = None,
    between: Between | None = None,
    inline: bool = False,
    every: int = 1,
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Train ``STEPS`` steps; the weights at each ``step()`` call (and at the end), and how many
    prefetched results the analyzer took."""
    opts = (optimizers or (lambda m: [torch.optim.Adam(m.parameters(), lr=0.05)]))(model)
    analyzer = Analyzer(model, path, every=every) if path is not None else None
    if analyzer is not None and inline:
        analyzer._prefetch = None
    seen: list[dict[str, torch.Tensor]] = []
    for step in range(STEPS):
        x, y = _data(step)
        loss = F.cross_entropy(model(x), y)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        if analyzer is not None:
            analyzer.step()
        for opt in opts:
            opt.step()
        if between is not None:
            between(model, step)
    seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    used = 0
    if analyzer is not None:
        analyzer.close()
        used = analyzer._prefetch.used if analyzer._prefetch is not None else 0
    return seen, used


def _ratios(path: Path) -> pd.DataFrame:
    frame = open_run(path).scalars("update_ratio")
    return frame.pivot(index="step", columns="param", values="value").sort_index()


def _assert_oracle(ratios: pd.DataFrame, seen: list[dict[str, torch.Tensor]], every: int = 1) -> None:
    """Each recorded step's ratio is the update of its own ``optimizer.step()``, in float64."""
    assert ratios.index.tolist() == list(range(0, STEPS, every))
    for step in ratios.index:
        before, after = seen[step], seen[step + 1]
        for name, b in before.items():
            delta, norm = float((after[name] - b).norm()), float(b.norm())
            want = delta / norm if norm > 0 else delta
            assert ratios.loc[step, name] == pytest.approx(want, rel=1e-5), (step, name)


def test_prefetched_ratios_equal_the_inline_pass_to_the_bit_and_float64(tmp_path: Path) -> None:
    seen, used = _train(_model(), tmp_path / "prefetch")
    inline_seen, inline_used = _train(_model(), tmp_path / "inline", inline=True)
    assert used == STEPS and inline_used == 0  # every update, the one at close() too
    prefetched, inline = _ratios(tmp_path / "prefetch"), _ratios(tmp_path / "inline")
    pd.testing.assert_frame_equal(prefetched, inline, check_exact=True)
    assert np.isfinite(prefetched.to_numpy()).all()
    _assert_oracle(prefetched, seen)
    for a, b in zip(seen, inline_seen, strict=True):  # the monitored trainings are the same
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_training_is_bit_identical_with_the_prefetch(tmp_path: Path) -> None:
    monitored, used = _train(_model(), tmp_path / "run")
    plain, _ = _train(_model(), None)
    assert used == STEPS
    for a, b in zip(monitored, plain, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def _clamp(model: nn.Module, step: int) -> None:
    if step % 2 == 0:
        with torch.no_grad():
            model[4].weight.clamp_(-0.05, 0.05)  # in place after the optimizer: a new version


def _replace(model: nn.Module, step: int) -> None:
    if step == 2:
        model[5].weight.data = model[5].weight.data.clone()  # a new tensor under the parameter


def _second_step(model: nn.Module, step: int) -> None:
    if step == 3:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        torch.optim.SGD(model.parameters(), lr=1e-3).step()  # another optimizer, after the pass began


@pytest.mark.parametrize(
    ("between", "dropped"),
    [(_clamp, 3), (_replace, 1), (_second_step, 1)],
    ids=["clamp", "replace", "second"],
)
def test_weights_changed_after_the_optimizer_step_are_measured_inline(
    tmp_path: Path, between: Between, dropped: int
) -> None:
    seen, used = _train(_model(), tmp_path / "run", between=between)
    assert used == STEPS - dropped
    _assert_oracle(_ratios(tmp_path / "run"), seen)


def test_optimizers_over_parts_of_the_model_start_no_pass(tmp_path: Path) -> None:
    def two(model: nn.Module) -> list[torch.optim.Optimizer]:  # a GAN-like split
        params = list(model.parameters())
        return [torch.optim.Adam(params[:3], lr=0.05), torch.optim.SGD(params[3:], lr=0.1)]

    seen, used = _train(_model(), tmp_path / "run", optimizers=two)
    assert used == 0
    _assert_oracle(_ratios(tmp_path / "run"), seen)


def test_another_models_optimizer_changes_nothing(tmp_path: Path) -> None:
    other = nn.Linear(4, 4)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)

    def step_the_other(model: nn.Module, step: int) -> None:
        other(torch.ones(2, 4)).sum().backward()
        other_opt.step()

    seen, used = _train(_model(), tmp_path / "run", between=step_the_other)
    assert used == STEPS
    _assert_oracle(_ratios(tmp_path / "run"), seen)


def test_every_other_step(tmp_path: Path) -> None:
    seen, used = _train(_model(), tmp_path / "run", every=2)
    assert used == STEPS // 2
    _assert_oracle(_ratios(tmp_path / "run"), seen, every=2)


def test_the_global_optimizer_hook_goes_with_the_analyzer(tmp_path: Path) -> None:
    before = len(_global_optimizer_post_hooks)
    model = _model()
    with Analyzer(model, tmp_path / "closed"):
        assert len(_global_optimizer_post_hooks) == before + 1
    assert len(_global_optimizer_post_hooks) == before
    dropped = Analyzer(model, tmp_path / "dropped")
    assert len(_global_optimizer_post_hooks) == before + 1
    del dropped
    gc.collect()
    assert len(_global_optimizer_post_hooks) == before


def test_the_pass_needs_a_core_torch_leaves_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: cpus)
        assert not spare_core()
        patch.setattr(torch, "get_num_threads", lambda: cpus - 1)
        assert spare_core()
    monkeypatch.setattr(ratio_prefetch, "spare_core", lambda: False)  # every core busy
    seen, used = _train(_model(), tmp_path / "run")
    assert used == 0
    _assert_oracle(_ratios(tmp_path / "run"), seen)


def test_taking_the_pass_leaves_the_held_bookkeeping_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``flush_every=3`` the steps' bookkeeping waits for the flush; ``step()`` waits for the
    ratio pass alone, so it hands nothing over: one bookkeeping request per three steps."""
    from bbdecoder.store.background import ThreadedRunWriter

    bookkeeping: list[int] = []
    original = ThreadedRunWriter._hand_over

    def spy(self, job, flush, locked=True):  # type: ignore[no-untyped-def]
        if job is not None and locked:  # not a ratio pass (run_soon: unlocked)
            bookkeeping.append(1)
        return original(self, job, flush, locked)

    monkeypatch.setattr(ThreadedRunWriter, "_hand_over", spy)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    analyzer = Analyzer(model, tmp_path / "run", flush_every=3)
    seen = []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        analyzer.step()
        opt.step()
    assert len(bookkeeping) == 2  # steps 0-2 and 3-5, each with its flush
    seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    analyzer.close()
    assert analyzer._prefetch is not None and analyzer._prefetch.used == STEPS  # the last at close
    _assert_oracle(_ratios(tmp_path / "run"), seen)


def test_an_error_of_the_pass_is_raised_by_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bbdecoder.monitor.weights import UpdateRatios

    def broken(self, current):  # type: ignore[no-untyped-def]
        raise RuntimeError("the pass failed")

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    analyzer = Analyzer(model, tmp_path / "run")
    monkeypatch.setattr(UpdateRatios, "measure_aside", broken)
    for step in range(2):
        x, y = _data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step == 0:
            analyzer.step()
            opt.step()  # starts the pass, which fails on the writer thread
        else:
            with pytest.raises(RuntimeError, match="the pass failed"):
                analyzer.step()
    monkeypatch.undo()
    analyzer.close()


class _TiedWithToken(nn.Module):
    """A container-owned parameter (ViT's ``cls_token``) and tied embedding/output weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.token = nn.Parameter(torch.randn(1, 8))
        self.embed = nn.Embedding(300, 8)
        self.head = nn.Linear(8, 300, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1) + self.token)


def test_container_parameters_and_tied_weights(tmp_path: Path) -> None:
    model = _TiedWithToken()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    analyzer = Analyzer(model, tmp_path / "run")
    seen: list[dict[str, torch.Tensor]] = []
    for step in range(STEPS):
        ids = torch.randint(0, 300, (4, 5), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(model(ids), ids[:, 0]).backward()
        seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        analyzer.step()
        opt.step()
    seen.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    analyzer.close()
    assert analyzer._prefetch is not None and analyzer._prefetch.used == STEPS
    ratios = _ratios(tmp_path / "run")
    assert set(ratios.columns) == {"token", "embed.weight"}  # the tied weight once
    _assert_oracle(ratios, seen)
