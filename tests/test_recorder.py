"""The recorder both monitors share, on its own: step rows, epoch aggregates against numpy, the one
NaN/Inf rule of the weight histograms, and non-finite events (warned unless loss-scaled)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bbdecoder.monitor.recorder import NonFiniteGradientWarning, Recorder, Series
from bbdecoder.store import RunWriter, open_run
from bbdecoder.store import vocabulary as V


def _recorder(path: Path, *, loss_scaled: bool = False) -> tuple[RunWriter, Recorder]:
    writer = RunWriter(path)
    writer.set_layers([(0, "fc", "Linear", 6, None)])
    series = [
        Series(i, 0, "fc", name, writer.series_id(0, name)) for i, name in enumerate(("fc.weight", "fc.bias"))
    ]
    return writer, Recorder(writer, series, histogram_bins=4, quantiles=(0.5,), loss_scaled=loss_scaled)


def _first(bad: list[Series]) -> Series:
    return bad[-1]


def test_steps_and_epoch_aggregates_equal_numpy(tmp_path: Path) -> None:
    writer, recorder = _recorder(tmp_path)
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 2, len(V.GRAD_STATS)))
    values[2, 1, 0] = np.nan  # a NaN mean is skipped by the aggregate (max_abs stays finite: no event)
    for step in range(5):
        assert recorder.step(step, 0, [0, 1], values[step], float(step), first_bad=_first) == []
    recorder.ratios(4, 0, [0, 1], np.array([0.1, 0.2]))
    recorder.end_epoch(0)
    writer.close()
    reader = open_run(tmp_path)
    scalars = reader.scalars()
    got = scalars[scalars.stat == "l2"].sort_values(["param", "step"])
    np.testing.assert_array_equal(got[got.param == "fc.bias"].value, values[:, 1, V.GRAD_STATS.index("l2")])
    assert list(reader.steps().loss) == [0.0, 1.0, 2.0, 3.0, 4.0]
    epochs = reader.epoch_scalars().set_index(["param", "stat", "agg"]).value
    bias_mean = values[:, 1, 0]
    assert epochs["fc.bias", "mean", V.AGG_MEAN] == pytest.approx(np.nanmean(bias_mean), rel=1e-12)
    assert epochs["fc.bias", "mean", V.AGG_VAR] == pytest.approx(np.nanvar(bias_mean), rel=1e-12)
    assert epochs["fc.weight", "var", V.AGG_VAR] == pytest.approx(values[:, 0, 3].var(), rel=1e-12)
    assert scalars[scalars.stat == V.UPDATE_RATIO].value.tolist() == [0.1, 0.2]
    assert reader.events().empty


def test_weight_histograms_follow_one_nan_inf_rule(tmp_path: Path) -> None:
    writer, recorder = _recorder(tmp_path)
    weight = torch.tensor([[-1.0, 0.5, float("nan")], [float("inf"), -float("inf"), 0.25]])
    bias = torch.tensor([float("nan"), float("nan")])  # nothing finite: the smallest usable range
    recorder.weights(0, 0, [0, 1], [weight, bias])
    writer.close()
    hist = open_run(tmp_path).weight_histograms()
    w = hist[hist.param == "fc.weight"]
    assert w.left.min() == pytest.approx(-1.5) and w.right.max() == pytest.approx(1.5)  # 1.5 max|finite|
    # NaN left out; -inf, -1 in the first bin, +inf in the last, 0.25 and 0.5 in the third
    assert w["count"].tolist() == [2, 0, 2, 1]
    b = hist[hist.param == "fc.bias"]
    assert b["count"].sum() == 0 and b.right.max() == pytest.approx(1e-3)
    stats = open_run(tmp_path).scalars().set_index(["param", "stat"]).value
    assert np.isnan(stats["fc.weight", V.WEIGHT_MEAN])  # the statistics show the divergence


def test_nonfinite_steps_store_one_event_and_warn_unless_loss_scaled(tmp_path: Path) -> None:
    for scaled in (False, True):
        path = tmp_path / str(scaled)
        writer, recorder = _recorder(path, loss_scaled=scaled)
        values = np.ones((2, len(V.GRAD_STATS)))
        values[:, V.GRAD_STATS.index(V.MAX_ABS)] = [np.inf, np.nan]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bad = recorder.step(3, 1, [0, 1], values, None, first_bad=_first)
        assert [s.name for s in bad] == ["fc.weight", "fc.bias"]
        assert [w.category for w in caught] == ([] if scaled else [NonFiniteGradientWarning])
        # a capture's own finiteness flags win over max_abs (Keras computes them on the device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonFiniteGradientWarning)
            assert recorder.step(4, 1, [0, 1], None, None, first_bad=_first, finite=np.array([True, False]))
        writer.close()
        events = open_run(path).events()
        assert list(events.kind) == [V.NONFINITE_GRAD, V.NONFINITE_GRAD]
        first = events.iloc[0]
        assert (
            first.param == "fc.bias"
            and first.step == 3
            and first.data == {"affected": ["fc.weight", "fc.bias"]}
        )
        assert "first in backward order is layer [0] fc (fc.bias)" in first.message
