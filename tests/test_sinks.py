"""MLflow and W&B sinks: a stored run exported to an MLflow local file store and read back with
MlflowClient equals the store value for value; a W&B offline run (no network) holds the same series,
read back from its .wandb file; live logging through the Analyzer's writer gives the same values."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.monitor import Analyzer
from bbdecoder.sinks import metric_name
from bbdecoder.store import open_run


def train(root: Path, attach=None, steps: int = 6) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    nn.init.zeros_(net[3].bias)  # a zero weight: its first update ratio is the absolute update size
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with Analyzer(net, root, input_size=(1, 1, 4, 4), activations=nn.ReLU) as analyzer:
        if attach is not None:
            attach(analyzer.writer)
        for step in range(steps):
            loss = F.cross_entropy(
                analyzer.forward_propagation(torch.randn(4, 1, 4, 4)), torch.randint(0, 2, (4,))
            )
            optimizer.zero_grad()
            analyzer.backward_propagation(loss)
            optimizer.step()
            if step % 3 == 2:
                analyzer.end_epoch()
    return root


def plant_infinite_ratio(root: Path, param: str) -> None:
    """The monitor stores ||dW|| where W was zero (never inf); a store from before that, or another
    writer, may hold an infinite value: plant one so that its export is tested too."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(root / "run.sqlite")) as conn, conn:
        conn.execute(
            "UPDATE scalars SET value = 9e999 WHERE step = 0 AND stat_id = "
            "(SELECT stat_id FROM stat_names WHERE name = 'update_ratio') AND series_id IN "
            "(SELECT series_id FROM series WHERE param = ?)",
            (param,),
        )


def expected_series(root: Path) -> dict[str, list[tuple[int, float]]]:
    with open_run(root) as reader:
        scalars, steps = reader.scalars(), reader.steps()
    out: dict[str, list[tuple[int, float]]] = {}
    for row in scalars.itertuples():
        out.setdefault(metric_name(row.stat, row.layer_id, row.layer, row.param), []).append(
            (int(row.step), float(row.value))
        )
    out["loss"] = [(int(s), float(v)) for s, v in zip(steps["step"], steps["loss"], strict=True)]
    return {k: sorted(v) for k, v in out.items()}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_same_series(
    got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]
) -> None:
    assert set(got) == set(want)
    for key, values in want.items():
        mine = sorted(got[key])
        assert [s for s, _ in mine] == [s for s, _ in values], key
        assert all(same(a, b) for (_, a), (_, b) in zip(mine, values, strict=True)), key


def test_names_group_by_statistic() -> None:
    assert metric_name("l2", 0, "conv", "conv.weight") == "grad_l2/conv.weight"
    assert metric_name("update_ratio", 3, "fc", "fc.bias") == "update_ratio/fc.bias"
    assert metric_name("dead_fraction", 1, "relu", "") == "dead_fraction/relu"
    assert metric_name("noise_scale", -1, "", "*") == "noise_scale/model"
    assert metric_name("l2", 2, "blocks.0", "blocks.0.attn[q]") == "grad_l2/blocks.0.attn_q_"


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store of the issue
    return (tmp_path / "mlruns").as_uri()


def mlflow_series(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = list(client.get_run(run_id).data.metrics)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def test_mlflow_export_equals_the_store_value_for_value(tmp_path: Path, mlflow_uri: str) -> None:
    from bbdecoder.sinks import export_mlflow

    root = train(tmp_path / "run")
    plant_infinite_ratio(root, "3.bias")
    want = expected_series(root)
    assert any(math.isinf(v) for _, v in want["update_ratio/3.bias"])
    run_id = export_mlflow(root, mlflow_uri)
    assert_same_series(mlflow_series(mlflow_uri, run_id), want)


def test_mlflow_live_logging_equals_the_store(tmp_path: Path, mlflow_uri: str) -> None:
    from bbdecoder.sinks import MLflowSink

    sinks = []
    root = train(
        tmp_path / "live", attach=lambda w: sinks.append(MLflowSink(mlflow_uri, run_name="live").attach(w))
    )
    run_id = sinks[0].sink.run_id
    assert_same_series(mlflow_series(mlflow_uri, run_id), expected_series(root))


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def test_wandb_offline_export_holds_the_same_series(tmp_path: Path, wandb_offline: Path) -> None:
    from bbdecoder.sinks import export_wandb, read_wandb_offline

    root = train(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = export_wandb(root, project="bbdecoder-test")
    assert folder.is_relative_to(wandb_offline) and folder.name.startswith("offline-run-")
    assert_same_series(read_wandb_offline(folder), expected_series(root))


def test_wandb_live_logging_in_step_order(tmp_path: Path, wandb_offline: Path) -> None:
    from bbdecoder.sinks import WandbSink, read_wandb_offline

    sinks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = train(tmp_path / "live", attach=lambda w: sinks.append(WandbSink("bbdecoder-test").attach(w)))
    # update ratios of step k are recorded with step k + 1: the buffer still logs them at step k
    assert_same_series(read_wandb_offline(sinks[0].sink.dir), expected_series(root))


def test_cli_export_to_mlflow_and_wandb(tmp_path: Path, mlflow_uri: str, wandb_offline: Path, capsys) -> None:
    from bbdecoder.cli import main
    from bbdecoder.sinks import read_wandb_offline

    root = train(tmp_path / "run", steps=3)
    want = expected_series(root)
    assert main(["export", str(root), "--mlflow", mlflow_uri]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    assert_same_series(mlflow_series(mlflow_uri, run_id), want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(root), "--wandb", "bbdecoder-cli"]) == 0
    folder = Path(capsys.readouterr().out.split("wandb sync ")[1].strip().rstrip(")"))
    assert_same_series(read_wandb_offline(folder), want)


def test_live_sink_feeds_take_turns_between_threads(tmp_path: Path) -> None:
    """The writer thread's jobs and a user's ``log()`` on the training thread both feed the live
    sink's step buffer; the second waits while the first hands a step to the sink."""
    import threading
    import time

    from bbdecoder.sinks.live import attach_sink
    from bbdecoder.store.background import ThreadedRunWriter

    order: list[str] = []
    entered, release = threading.Event(), threading.Event()

    class SlowSink:
        def log_step(self, step: int, metrics: dict[str, float], timestamp: float) -> None:
            order.append(f"log {step} start")
            if step == 0:
                entered.set()
                release.wait(10)
            order.append(f"log {step} end")

        def close(self) -> None:
            pass

    writer = ThreadedRunWriter(tmp_path / "run")
    attach_sink(writer, SlowSink())
    series, stat = writer.series_id(-1, "user"), writer.stat_id("val_acc")
    writer.add_scalars([(0, 0, series, stat, 0.5)])
    first = threading.Thread(target=writer.add_step, args=(1, 0, None))  # releases step 0
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=writer.add_scalars, args=([(1, 0, series, stat, 0.6)],))
    second.start()
    time.sleep(0.2)  # without the turns the second feed would change the buffer now
    order.append("second fed" if not second.is_alive() else "second waits")
    release.set()
    first.join(10)
    second.join(10)
    assert order[:3] == ["log 0 start", "second waits", "log 0 end"]
    writer.close()
