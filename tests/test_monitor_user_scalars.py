"""Analyzer.log(**scalars), the learning rate and loss recorded when attached, and resume=True."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from torch import nn

from bbdecoder import Analyzer, StoreError, open_run


def make_model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def train(
    analyzer: Analyzer, model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, log_loss: bool
) -> list[float]:
    losses = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=generator)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if log_loss:
            analyzer.log(loss=loss)
        losses.append(float(loss))
    return losses


def user_rows(path: Path, param: str = "user"):
    rows = open_run(path).scalars()
    return rows[(rows.layer_id == -1) & (rows.param == param)]


def test_attach_records_learning_rates_and_logged_loss(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}], lr=0.1
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    analyzer = Analyzer(model, tmp_path, alerts=False).attach(opt)
    losses = []
    for _ in range(3):
        losses += train(analyzer, model, opt, 1, log_loss=True)
        scheduler.step()
    analyzer.log(val_acc=0.75)
    analyzer.end_epoch()
    analyzer.close()

    steps = open_run(tmp_path).steps()
    assert list(steps.step) == [0, 1, 2]
    assert steps.loss.tolist() == pytest.approx(losses, rel=1e-6)  # the report's loss curve

    lr = user_rows(tmp_path, "optimizer").pivot(index="step", columns="stat", values="value")
    assert lr["lr"].tolist() == pytest.approx([0.1, 0.05, 0.025])  # the lr each step used
    assert lr["lr_group1"].tolist() == pytest.approx([0.05, 0.025, 0.0125])

    user = user_rows(tmp_path)
    assert user[user.stat == "loss"].value.tolist() == pytest.approx(losses, rel=1e-6)
    acc = user[user.stat == "val_acc"]
    assert acc.step.tolist() == [2] and acc.value.tolist() == [0.75]  # the step just taken


def test_without_a_logged_loss_the_steps_have_none(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path, alerts=False).attach(opt) as analyzer:
        train(analyzer, model, opt, 2, log_loss=False)
    assert open_run(tmp_path).steps().loss.isna().all()


def test_loss_set_after_the_step_row_was_written(tmp_path: Path) -> None:
    """flush_every=1 writes the step row before log(loss=) comes: the stored row is updated."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path, alerts=False, flush_every=1).attach(opt) as analyzer:
        losses = train(analyzer, model, opt, 2, log_loss=True)
        analyzer.writer.flush()
        assert open_run(tmp_path).steps().loss.tolist() == pytest.approx(losses, rel=1e-6)


def test_per_epoch_values(tmp_path: Path) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path, alerts=False).attach(opt) as analyzer:
        for epoch in range(2):
            train(analyzer, model, opt, 2, log_loss=False)
            analyzer.end_epoch()
            analyzer.log(epoch=True, val_acc=0.5 + epoch / 10)  # the epoch that just ended
        analyzer.log(epoch=7, note=1)
        analyzer.log(step=0, first=3.0)
    epochs = open_run(tmp_path).epoch_scalars()
    mine = epochs[(epochs.layer_id == -1) & (epochs.param == "user")]
    assert mine[mine.stat == "val_acc"][["epoch", "agg", "value"]].values.tolist() == [
        [0, "value", 0.5],
        [1, "value", 0.6],
    ]
    assert mine[mine.stat == "note"].epoch.tolist() == [7]
    first = user_rows(tmp_path)
    assert first[first.stat == "first"].step.tolist() == [0]


def test_log_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    with Analyzer(make_model(), tmp_path, alerts=False) as analyzer:
        with pytest.raises(TypeError, match="at least one value"):
            analyzer.log()
        with pytest.raises(ValueError, match="one number"):
            analyzer.log(acc=torch.ones(3))
        with pytest.raises(TypeError, match="a number"):
            analyzer.log(acc="high")
        with pytest.raises(TypeError, match="epoch number"):
            analyzer.log(epoch=-1, acc=1.0)
        with pytest.raises(TypeError, match="not both"):
            analyzer.log(epoch=1, step=2, acc=1.0)


def run_once(path: Path, model: nn.Module, steps: int = 2, **kwargs: object) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, path, alerts=False, **kwargs).attach(opt) as analyzer:  # type: ignore[arg-type]
        train(analyzer, model, opt, steps, log_loss=True)


def test_resume_appends_to_the_same_model(tmp_path: Path) -> None:
    run_once(tmp_path, make_model())
    run_once(tmp_path, make_model(), steps=3, resume=True)
    steps = open_run(tmp_path).steps()
    assert list(steps.step) == [0, 1, 2, 3, 4]
    assert list(steps.epoch) == [0, 0, 1, 1, 1]  # the resumed run continues with the next epoch
    assert steps.loss.notna().all()


def test_a_run_folder_with_steps_is_refused_without_resume(tmp_path: Path) -> None:
    run_once(tmp_path, make_model())
    before = open_run(tmp_path).steps()
    with pytest.raises(StoreError, match=r"already holds a run of Sequential \(2 steps\).*resume=True"):
        Analyzer(make_model(), tmp_path)
    assert open_run(tmp_path).steps().equals(before)  # nothing written
    Analyzer(make_model(), tmp_path / "new").close()  # a new folder is fine


def test_resume_refuses_another_model_with_the_reason(tmp_path: Path) -> None:
    run_once(tmp_path, make_model(width=4))
    with pytest.raises(
        StoreError,
        match=r"another Sequential \(2 steps\), so resume=True cannot append.*have another shape "
        r"\(e\.g\. 0\.weight \[4, 3\] -> \[5, 3\]",
    ):
        Analyzer(make_model(width=5), tmp_path, resume=True)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(StoreError, match=r"parameters of this model are not in the store \(e\.g\. 3\.weight"):
        Analyzer(other, tmp_path, resume=True)
    assert len(open_run(tmp_path).steps()) == 2


def test_resume_of_a_store_without_the_parameter_list(tmp_path: Path) -> None:
    """Stores written before the parameter list was stored are compared by their layer table."""
    run_once(tmp_path, make_model(width=4))
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    with conn:
        conn.execute("DELETE FROM artifacts WHERE name = 'parameters.json'")
    conn.close()
    with pytest.raises(StoreError, match="layer table differs"):
        Analyzer(make_model(width=5), tmp_path, resume=True)
    run_once(tmp_path, make_model(width=4), resume=True)
    assert len(open_run(tmp_path).steps()) == 4


def test_the_report_shows_the_loss_and_the_logged_values(tmp_path: Path) -> None:
    from bbdecoder import build_report

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path, alerts=False).attach(opt) as analyzer:
        train(analyzer, model, opt, 3, log_loss=True)
        analyzer.log(val_acc=0.5)
        analyzer.end_epoch()
        analyzer.log(epoch=True, val_top5=0.9)
    import warnings

    from bbdecoder.report import ReportSectionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportSectionWarning)  # a section that fails would warn
        page = build_report(tmp_path).read_text()
    assert "training loss per step" in page  # the loss curve, from log(loss=)
    assert "Logged values and learning rates" in page
    for title in ("lr per step", "val_acc per step", "loss per step", "values per epoch", "val_top5"):
        assert title in page, title


class _KeptSteps:
    """A live sink that keeps what it is handed, in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []

    def log_step(self, step: int, metrics: dict[str, float], timestamp: float) -> None:
        self.steps.append((step, dict(metrics)))

    def close(self) -> None:
        pass


@pytest.mark.parametrize("flush_every", [1, 4])
def test_logged_values_reach_a_live_sink_after_the_held_steps(tmp_path: Path, flush_every: int) -> None:
    """With ``flush_every=4`` the steps' tables are held until the flush; a ``log()`` after each
    step and the learning rates still reach a live sink after the steps before them: in ascending
    order (the ``Sink`` promise; W&B ignores a step that comes after a later one), every step with
    its gradient statistics, update ratios, learning rate and logged value. (A step can come in
    two parts, its update ratios measured a step later: W&B merges a repeated step.)"""
    from bbdecoder.sinks.live import attach_sink

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = _KeptSteps()
    with Analyzer(model, tmp_path, alerts=False, flush_every=flush_every).attach(opt) as analyzer:
        attach_sink(analyzer.writer, sink)
        generator = torch.Generator().manual_seed(1)
        for step in range(10):
            loss = model(torch.randn(8, 3, generator=generator)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            analyzer.log(val=float(step), loss=loss)
    order = [s for s, _ in sink.steps]
    assert order == sorted(order) and set(order) == set(range(10))
    merged: dict[int, dict[str, float]] = {}
    for step, metrics in sink.steps:
        merged.setdefault(step, {}).update(metrics)
    for step, metrics in merged.items():
        assert metrics["val/model"] == step
        assert metrics["lr/model"] == pytest.approx(0.1)
        expected = {"loss/model", "grad_l2/0.weight", "grad_l2/2.bias", "update_ratio/0.weight"}
        assert expected <= set(metrics), step
    stored = open_run(tmp_path).scalars()
    assert sorted(stored[stored.stat == "val"].step) == list(range(10))
