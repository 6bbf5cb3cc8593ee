"""Live TensorBoard logging from the Analyzer and export of a finished run, read back with
TensorBoard's own event reader."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
from tensorboard.backend.event_processing import event_accumulator

from bbdecoder.monitor import Analyzer
from bbdecoder.monitor.tensorboard import TensorBoardLogger, summary_writer
from bbdecoder.report import store_image, store_table
from bbdecoder.store import RunWriter, open_run
from bbdecoder.store.export import export_tensorboard, scalar_tag


def read_events(log_dir: Path) -> event_accumulator.EventAccumulator:
    keep_all = {
        event_accumulator.SCALARS: 0,
        event_accumulator.HISTOGRAMS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
    }
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance=keep_all)
    acc.Reload()
    return acc


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Five training steps with live logging; the gradient norms and losses measured independently."""
    root = tmp_path_factory.mktemp("tb")
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    logger = TensorBoardLogger(root / "live", histogram_every=2)
    norms: list[dict[str, float]] = []
    losses: list[float] = []
    g = torch.Generator().manual_seed(1)
    with Analyzer(net, root / "run", tensorboard=logger) as analyzer:
        for _ in range(5):
            x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss = F.cross_entropy(analyzer.forward_propagation(x), y)
            optimizer.zero_grad()
            analyzer.backward_propagation(loss)
            norms.append({n: float(p.grad.double().norm()) for n, p in net.named_parameters()})
            losses.append(loss.item())
            optimizer.step()
        analyzer.end_epoch()
    assert logger.closed
    writer = RunWriter(root / "run")
    picture = np.zeros((5, 7, 3), dtype=np.uint8)
    picture[1:3, 2:6] = (200, 30, 90)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    store_image(writer, "red patch", buffer.getvalue(), section="saliency")
    store_table(writer, "scores", pd.DataFrame({"method": ["a"], "auc": [0.5]}), section="metrics")
    writer.close()
    return {"root": root, "norms": norms, "losses": losses, "picture": picture, "net": net}


def test_live_scalars_match_an_independent_gradient_norm(live_run: dict) -> None:
    acc = read_events(live_run["root"] / "live")
    tags = acc.Tags()
    for name in dict(live_run["net"].named_parameters()):
        events = acc.Scalars(f"grad_l2/{name}")
        assert [e.step for e in events] == [0, 1, 2, 3, 4]
        expected = [step_norms[name] for step_norms in live_run["norms"]]
        np.testing.assert_allclose([e.value for e in events], expected, rtol=1e-5)
    np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], live_run["losses"], rtol=1e-6)
    assert {"grad_mean/0.weight", "grad_var/3.bias", "grad_max_abs/3.weight"} <= set(tags["scalars"])


def test_live_histograms_and_image(live_run: dict) -> None:
    acc = read_events(live_run["root"] / "live")
    weights = acc.Histograms("weights/0.weight")
    assert [h.step for h in weights] == [0, 2, 4]  # histogram_every=2
    assert all(h.histogram_value.num == 4 * 1 * 3 * 3 for h in weights)
    assert [h.step for h in acc.Histograms("grads/3.weight")] == [0, 2, 4]
    images = acc.Images("gradient_flow")
    assert [i.step for i in images] == [0, 2, 4]
    with Image.open(io.BytesIO(images[0].encoded_image_string)) as picture:
        assert picture.size[0] > 100 and picture.size[1] > 100


def test_export_reproduces_every_stored_value(live_run: dict, tmp_path: Path) -> None:
    run_dir = live_run["root"] / "run"
    export_tensorboard(run_dir, tmp_path / "exported")
    acc = read_events(tmp_path / "exported")
    reader = open_run(run_dir)
    scalars = reader.scalars().dropna(subset=["value"])
    assert len(scalars) > 100
    for (stat, param, layer), group in scalars.groupby(["stat", "param", "layer"]):
        events = acc.Scalars(scalar_tag(stat, param, layer))
        stored = dict(zip(group["step"], group["value"], strict=True))
        assert {e.step: e.value for e in events}.keys() == stored.keys()
        for event in events:
            assert event.value == pytest.approx(stored[event.step], rel=1e-6, abs=1e-30)
    hist = reader.histograms(kind="weight")
    for (step, param), group in hist.groupby(["step", "param"]):
        (value,) = [h for h in acc.Histograms(f"weights/{param}") if h.step == step]
        proto = value.histogram_value
        assert list(proto.bucket)[1:] == group.sort_values("bin")["count"].tolist()
        assert proto.bucket[0] == 0 and proto.bucket_limit[0] == pytest.approx(group["left"].min())
        assert proto.num == group["count"].sum()
    (image,) = acc.Images("saliency/red patch")
    with Image.open(io.BytesIO(image.encoded_image_string)) as picture:
        np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), live_run["picture"])
    assert "metrics/scores/text_summary" in acc.Tags()["tensors"]  # add_text writes a tensor summary
    epoch_tags = [t for t in acc.Tags()["scalars"] if t.startswith("epoch_mean/")]
    assert "epoch_mean/l2/0.weight" in epoch_tags
    reader.close()


def test_missing_tensorboard_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        summary_writer(tmp_path)


def test_analyzer_option_forms(tmp_path: Path) -> None:
    net = model()
    with Analyzer(net, tmp_path / "a", tensorboard=True) as analyzer:
        assert analyzer.tensorboard is not None
        assert analyzer.tensorboard.log_dir == tmp_path / "a" / "tensorboard"
    with Analyzer(net, tmp_path / "b") as analyzer:
        assert analyzer.tensorboard is None
    with pytest.raises(TypeError, match="tensorboard= takes"):
        Analyzer(net, tmp_path / "c", tensorboard=3)


def test_per_sample_statistics_and_noise_scale_live_and_exported(tmp_path: Path) -> None:
    """With per_sample=k, the live event files hold every stored per-sample and noise-scale value
    under the exporter's tags (``noise_scale/model`` for the whole model)."""
    from bbdecoder.monitor.per_sample_recorder import NOISE_STATS, PER_SAMPLE_STATS

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    logger = TensorBoardLogger(tmp_path / "live", histogram_every=0)
    with Analyzer(net, tmp_path / "run", tensorboard=logger, per_sample=2) as analyzer:
        for _ in range(5):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            analyzer.step(loss=loss)
            optimizer.step()
    frame = open_run(tmp_path / "run").scalars()
    frame = frame[frame.stat.isin(PER_SAMPLE_STATS + NOISE_STATS)]
    assert sorted(set(frame.step)) == [0, 2, 4] and "noise_scale" in set(frame.stat)
    export_tensorboard(tmp_path / "run", tmp_path / "exported")
    for folder in ("live", "exported"):
        acc = read_events(tmp_path / folder)
        for (stat, param, layer), group in frame.groupby(["stat", "param", "layer"]):
            tag = scalar_tag(stat, param, layer)
            assert tag.endswith("/model") == (param == "*")
            events = {e.step: e.value for e in acc.Scalars(tag)}
            stored = dict(zip(group["step"], group["value"], strict=True))
            assert events.keys() == stored.keys(), (folder, tag)
            for step, value in stored.items():
                assert events[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (folder, tag)
