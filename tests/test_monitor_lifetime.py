"""The monitor never leaks and never kills a run: arguments checked where given, a failed or dropped
Analyzer leaves no hook and no open file, huge finite gradients stay finite, an all-NaN epoch still
draws its figures."""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.hooks import count_hooks
from bbdecoder.monitor import Analyzer, NonFiniteGradientWarning
from bbdecoder.monitor.grad_stats import GradStatistics
from bbdecoder.store import open_run


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _param_hooks(model: nn.Module) -> int:
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def _train_step(an: Analyzer, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,)))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_dropped_analyzers_detach_and_close_their_store(tmp_path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gc.collect()
    fds = _fds()
    for i in range(20):
        an = Analyzer(model, tmp_path / f"run{i}", activations=True).attach(opt)
        _train_step(an, model, opt)
        del an  # dropped without close(), as a re-run notebook cell does
    gc.collect()
    assert count_hooks(model) == 0 and _param_hooks(model) == 0
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert _fds() == fds
    _train_step(None, model, opt)  # type: ignore[arg-type]  # training goes on, nothing fires
    assert open_run(tmp_path / "run3").steps()["step"].tolist() == [0]  # its rows were flushed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"activations": [99]}, IndexError, "layer ID 99"),
        ({"activations": []}, ValueError, "watches nothing"),
        ({"layers": []}, ValueError, "selection is empty"),
        ({"layers": ["nope"]}, KeyError, "nope"),
        ({"tensorboard": 3}, TypeError, "tensorboard"),
        ({"histogram_bins": 0}, ValueError, "histogram_bins"),
        ({"histogram_bins": -4}, ValueError, "histogram_bins"),
        ({"quantiles": (0.5, 1.5)}, ValueError, "quantiles"),
        ({"quantiles": (-0.1,)}, ValueError, "quantiles"),
        ({"channel_dim": "1"}, TypeError, "channel_dim"),
        ({"channel_dim": 3, "input_size": (2, 4), "activations": [1]}, ValueError, "channel_dim=3"),
        ({"flush_every": 0}, ValueError, "flush_every"),
        ({"every": 0}, ValueError, "every"),
        ({"saturation_eps": 0.7}, ValueError, "saturation_eps"),
    ],
)
def test_bad_arguments_refused_at_construction_leaving_nothing(tmp_path, kwargs, error, match) -> None:
    model = _model()
    gc.collect()
    fds = _fds()
    with pytest.raises(error, match=match):
        Analyzer(model, tmp_path / "run", **kwargs)
    gc.collect()
    assert count_hooks(model) == 0 and _param_hooks(model) == 0 and _fds() == fds


def test_failure_after_the_store_opened_undoes_everything(tmp_path, monkeypatch) -> None:
    from bbdecoder.monitor import activation_watch

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure while hooking")

    model = _model()
    gc.collect()
    fds = _fds()
    monkeypatch.setattr(activation_watch.ActivationWatcher, "check_dims", broken)
    with pytest.raises(RuntimeError, match="planted"):
        Analyzer(model, tmp_path / "run", activations=True)
    gc.collect()
    assert count_hooks(model) == 0 and _param_hooks(model) == 0 and _fds() == fds
    assert (tmp_path / "run" / "run.sqlite").exists()  # the store was opened before any hook


def test_arguments_of_calls_checked_where_given(tmp_path) -> None:
    model = _model()
    with Analyzer(model, tmp_path) as an:
        F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
        with pytest.raises(TypeError, match="loss must be a scalar tensor or a number"):
            an.step(loss="0.3")  # type: ignore[arg-type]
        an.step(loss=0.25)  # a plain number is a loss too
        with pytest.raises(TypeError, match="epoch number must be an int"):
            an.end_epoch("one")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="selection is empty"):
            an.step(layers=[])
        assert an.end_epoch(4) == 4
    run = open_run(tmp_path)
    assert run.steps()["loss"].tolist() == [0.25] and run.epochs() == [4]


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(256, 200)  # 51,200 weights: the scratch-buffer path
        self.small = nn.Linear(200, 3)  # the float64 segment path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.tanh(self.big(x)))


def test_huge_finite_gradients_stay_finite_and_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = Scaled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        with Analyzer(model, tmp_path) as an:
            loss = F.cross_entropy(model(torch.randn(16, 256)), torch.randint(0, 3, (16,))) * 1e20
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            assert all(torch.isfinite(g).all() for g in grads.values())  # finite on the gradients
            assert max(g.abs().max().item() for g in grads.values()) > 1e18  # squares overflow float32
            an.step()
    sc = open_run(tmp_path).scalars()
    assert open_run(tmp_path).events("nonfinite_grad").empty
    for row in sc[sc.stat.isin(["var", "l2", "l1", "max_abs"])].itertuples():
        g = grads[row.param].double()
        want = {"var": g.var(correction=0), "l2": g.norm(), "l1": g.abs().sum(), "max_abs": g.abs().max()}
        assert np.isfinite(row.value)
        assert row.value == pytest.approx(want[row.stat].item(), rel=1e-6), (row.param, row.stat)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("numel", [1_000, 200_000])
def test_variance_exact_when_the_mean_dwarfs_the_spread(numel, scaled, monkeypatch) -> None:
    from bbdecoder.monitor import grad_stats

    if scaled:  # the path CUDA always takes
        monkeypatch.setattr(grad_stats, "_squares_fit", lambda *a: False)
    # gradients like 1000 + N(0, 1): a one-pass float32 E[g^2] - E[g]^2 is off by ~10% here
    g = 1000.0 + torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    var = GradStatistics()([g])[0, 3].item()
    d = g.double()
    assert var == pytest.approx(d.var(correction=0).item(), rel=1e-5)
    one_pass = (g * g).mean() - g.mean() ** 2
    assert abs(one_pass.item() - var) > 1e-3  # the oracle would catch that formula


def test_variance_through_the_analyzer_against_float64(tmp_path) -> None:
    model = nn.Linear(300, 200)  # weight 60,000 elements, bias 200
    coefficients = {n: 1000.0 + torch.randn_like(p) for n, p in model.named_parameters()}
    with Analyzer(model, tmp_path) as an:
        sum((p * coefficients[n]).sum() for n, p in model.named_parameters()).backward()  # grad = coefficient
        an.step()
    sc = open_run(tmp_path).scalars("var").set_index("param")["value"]
    for name, c in coefficients.items():
        assert sc[name] == pytest.approx(c.double().var(correction=0).item(), rel=1e-5), name


def test_all_nan_epoch_still_draws_the_gradient_figures(tmp_path) -> None:
    model = _model()
    an = Analyzer(model, tmp_path / "run")
    for _ in range(2):
        loss = F.cross_entropy(an.forward_propagation(torch.randn(5, 4)), torch.randint(0, 3, (5,)))
        with pytest.warns(NonFiniteGradientWarning):
            an.backward_propagation(loss * float("nan"))
    paths = an.save_collected_grads(tmp_path / "figs", ep=0)  # no KeyError('max_abs')
    an.close()
    assert [p.name for p in paths] == ["grad_flow_ep000.png", "grad_norms_ep000.png"]
    from bbdecoder.viz.monitor_plots import _epoch_grad_means

    table = _epoch_grad_means(open_run(tmp_path / "run"), 0)
    assert len(table) == 4 and table["max_abs"].isna().all()  # every parameter there, as a marker


def _train_recorded(path, *, every: int = 1, deferred: bool = False, steps: int = 6, flush_every: int = 1):
    from bbdecoder.monitor.host_copy import HostCopy

    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    an = Analyzer(model, path, every=every, flush_every=flush_every)
    if deferred:  # the CUDA path: each step's vector is read one step later
        an._host = HostCopy(deferred=True)
    before, after = [], []
    for i in range(steps):
        x = torch.randn(5, 4)
        loss = F.cross_entropy(model(x), torch.randint(0, 3, (5,)))
        if i == 3:
            loss = loss * float("inf")
        opt.zero_grad()
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteGradientWarning)
            an.step(loss=loss)
        before.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        if i != 3:
            opt.step()
        after.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    an.close()
    return open_run(path), before, after


def test_deferred_host_copy_stores_exactly_what_the_immediate_one_does(tmp_path) -> None:
    now, _, _ = _train_recorded(tmp_path / "now")
    later, _, _ = _train_recorded(tmp_path / "later", deferred=True)
    a, b = now.scalars(), later.scalars()
    assert len(a) == len(b) and len(a) > 0
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(a, b)
    assert now.steps()["loss"].tolist()[:3] == later.steps()["loss"].tolist()[:3]
    assert (
        later.events("nonfinite_grad")["step"].tolist()
        == [3]
        == now.events("nonfinite_grad")["step"].tolist()
    )


def test_deferred_host_copy_does_its_bookkeeping_on_the_writer_thread(tmp_path, monkeypatch) -> None:
    """The CUDA path (run here on CPU) hands each finite step's bookkeeping to the writer thread, as
    the CPU path does; the non-finite step (3) stays on the training thread, where its warning is
    raised, and the last step is drained there at close. The stored rows are those of the
    immediate copy (the test above)."""
    import threading

    from bbdecoder.store.background import ThreadedRunWriter

    ran_on: list[bool] = []
    original = ThreadedRunWriter.run_then_flush

    def spy(self, job, flush=True):  # type: ignore[no-untyped-def]
        def watched() -> None:
            ran_on.append(threading.current_thread() is threading.main_thread())
            job()

        return original(self, watched, flush)

    monkeypatch.setattr(ThreadedRunWriter, "run_then_flush", spy)
    run, _, _ = _train_recorded(tmp_path, deferred=True)
    assert ran_on == [False] * 4  # steps 0, 1, 2 and 4
    assert run.steps()["step"].tolist() == list(range(6))
    assert run.events("nonfinite_grad")["step"].tolist() == [3]


@pytest.mark.parametrize("deferred", [False, True])
def test_flush_every_wakes_the_writer_thread_once_per_flush_and_stores_the_same(
    tmp_path, monkeypatch, deferred: bool
) -> None:
    """With ``flush_every=4`` the steps' bookkeeping is held on the training thread and handed to
    the writer thread with the flush (the non-finite step 3 hands over what is held first, then is
    recorded here); the store is the one ``flush_every=1`` writes, row for row."""
    from bbdecoder.store.background import ThreadedRunWriter

    requests: list[bool] = []  # per request to the writer thread: does it carry bookkeeping
    original = ThreadedRunWriter._hand_over

    def spy(self, job, flush, locked=True):  # type: ignore[no-untyped-def]
        requests.append(job is not None and locked)  # not a ratio pass (run_soon: unlocked)
        return original(self, job, flush, locked)

    monkeypatch.setattr(ThreadedRunWriter, "_hand_over", spy)
    each, _, _ = _train_recorded(tmp_path / "each", steps=13, deferred=deferred)
    jobs_each = sum(requests)
    requests.clear()
    batched, _, _ = _train_recorded(tmp_path / "batched", steps=13, flush_every=4, deferred=deferred)
    assert jobs_each >= 11  # a job per finite step
    assert sum(requests) <= 5  # steps 0-2 before step 3, 4-6 with 7, 8-10 with 11, 12 at close
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(each.scalars(), batched.scalars())
    assert each.steps().drop(columns="time").equals(batched.steps().drop(columns="time"))
    assert batched.steps()["step"].tolist() == list(range(13))
    nonfinite = [run.events("nonfinite_grad")["step"].tolist() for run in (each, batched)]
    assert nonfinite == [[3], [3]]


def test_every_records_every_kth_step_and_the_update_after_it(tmp_path) -> None:
    run, before, after = _train_recorded(tmp_path, every=2)
    assert run.steps()["step"].tolist() == [0, 2, 4]
    assert run.meta()["record_every"] == "2"  # shown in the report's run summary
    sc = run.scalars()
    assert set(sc[sc.stat == "l2"].step) == {0, 2, 4}
    ratios = sc[sc.stat == "update_ratio"]
    assert set(ratios.step) == {0, 2, 4}
    for row in ratios.itertuples():
        w0, w1 = before[row.step][row.param], after[row.step][row.param]
        want = (w1 - w0).norm() / w0.norm() if w0.norm() > 0 else (w1 - w0).norm()
        assert row.value == pytest.approx(want.item(), rel=1e-5)


def test_every_lets_an_epoch_pass_unrecorded_and_a_resumed_run_keeps_counting(tmp_path) -> None:
    """``every=4`` with 3 steps per epoch: epoch 1 (steps 3-5) records nothing but still ends with its
    weight statistics, and after ``close`` a resumed analyzer continues at step 6 and epoch 2 (the
    store's meta: steps 3 to 5 have no rows) and records step 8, a multiple of 4 as before."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    with Analyzer(model, tmp_path, every=4).attach(opt) as an:
        for epoch in range(2):
            for _ in range(3):
                _train_step(an, model, opt)
            assert an.end_epoch() == epoch
    with Analyzer(model, tmp_path, every=4, resume=True).attach(opt) as an:
        assert (an.current_step, an.current_epoch) == (6, 2)
        for _ in range(3):
            _train_step(an, model, opt)
        assert an.end_epoch() == 2
    run = open_run(tmp_path)
    assert run.steps()["step"].tolist() == [0, 4, 8]
    weights = run.scalars().query("stat == 'weight_l2'")
    assert sorted(set(zip(weights.epoch, weights.step, strict=True))) == [(0, 2), (1, 5), (2, 8)]
    final = weights[weights.epoch == 2].set_index("param").value
    for name, p in model.named_parameters():
        assert final[name] == pytest.approx(p.detach().double().norm().item(), rel=1e-6)
