"""The bookkeeping of a CPU step on the store's writer thread: the same store as on the training
thread, non-finite steps and warnings on the training thread, a job's error raised there."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.alerts import AlertConfig, AlertWarning
from bbdecoder.monitor import Analyzer, NonFiniteGradientWarning
from bbdecoder.monitor.recorder import Recorder
from bbdecoder.store import open_run
from bbdecoder.store.vocabulary import GRAD_STATS, UPDATE_RATIO

STEPS = 8


def _train(root: Path, *, threaded: bool = True, spike_at: int | None = None, **kwargs: object) -> Analyzer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    analyzer = Analyzer(model, root, **kwargs)  # type: ignore[arg-type]
    if not threaded:
        analyzer.writer.run_then_flush = None  # type: ignore[assignment,method-assign]  # the inline path
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(model(x), y) * (1e4 if i == spike_at else 1.0)
        opt.zero_grad()
        loss.backward()
        analyzer.step(loss=loss)
        opt.step()
        if i == 3:
            analyzer.end_epoch()
    analyzer.close()
    return analyzer


def _stored(root: Path) -> list[pd.DataFrame]:
    with open_run(root) as reader:
        events = reader.events().drop(columns=["event_id", "time"], errors="ignore")
        return [reader.scalars(), reader.steps(), reader.epoch_scalars(), events]


def test_the_writer_thread_stores_what_the_training_thread_would(tmp_path: Path) -> None:
    rules = AlertConfig(explode_min_history=2, explode_floor=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlertWarning)
        _train(tmp_path / "threaded", alerts=rules, spike_at=6)
        _train(tmp_path / "inline", threaded=False, alerts=rules, spike_at=6)
    threaded, inline = _stored(tmp_path / "threaded"), _stored(tmp_path / "inline")
    scalars = threaded[0]
    assert (scalars.stat.isin(GRAD_STATS)).sum() == STEPS * 4 * len(GRAD_STATS)  # 4 tensors
    assert (scalars.stat == UPDATE_RATIO).sum() == STEPS * 4  # the last one measured by close()
    assert "exploding_grad" in set(threaded[3].kind)
    for got, want in zip(threaded, inline, strict=True):
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))


def test_finite_steps_on_the_writer_thread_a_non_finite_one_here(tmp_path: Path, monkeypatch) -> None:
    threads: list[str] = []
    original = Recorder.step

    def step(self: Recorder, *args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Recorder, "step", step)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with Analyzer(model, tmp_path) as analyzer:
        for i in range(3):
            x = torch.randn(8, 4)
            if i == 2:
                x[0, 0] = float("nan")
            model.zero_grad()
            F.mse_loss(model(x), torch.zeros(8, 2)).backward()
            if i == 2:
                with pytest.warns(NonFiniteGradientWarning, match="non-finite gradient at step 2"):
                    analyzer.step()  # raised by this call, not a later one
            else:
                analyzer.step()
    assert threads == ["bbdecoder-store-writer", "bbdecoder-store-writer", "MainThread"]


def test_an_alert_of_the_writer_thread_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    shown: list[tuple[type[Warning], str]] = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, *a, **k: shown.append(  # type: ignore[assignment]
            (category, threading.current_thread().name)
        )
        _train(tmp_path, alerts=AlertConfig(explode_min_history=2, explode_floor=0), spike_at=6)
    assert (AlertWarning, "MainThread") in shown
    assert all(thread == "MainThread" for _, thread in shown)


def test_an_error_of_a_job_is_raised_by_the_next_call(tmp_path: Path, monkeypatch) -> None:
    model = nn.Linear(4, 2)
    analyzer = Analyzer(model, tmp_path)
    original = Recorder.step

    def failing(self: Recorder, step: int, *args: object, **kwargs: object) -> object:
        if step == 1:
            raise RuntimeError("recorder failed")
        return original(self, step, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Recorder, "step", failing)
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        analyzer.step()  # step 1 fails on the writer thread
    model.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="recorder failed"):
        analyzer.step()
    analyzer.close()
    # step 0 was committed before the failure; step 2, whose step() raised it, was kept and
    # written at close; step 1 is the one that failed
    assert list(open_run(tmp_path).steps().step) == [0, 2]
