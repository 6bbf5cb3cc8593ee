"""The Keras monitor: stored gradient statistics and update ratios equal a float64 numpy replay of the
same training (analytic gradients of a linear two-layer net), with the PyTorch run's columns."""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from bbdecoder.keras import keras, tf
from bbdecoder.keras.monitor import MonitorCallback, gradient_statistics, qualified_layer_names
from bbdecoder.monitor import NonFiniteGradientWarning
from bbdecoder.monitor.activation_watch import ACTIVATION_STATS
from bbdecoder.store import open_run
from bbdecoder.store.reader import SCALAR_COLUMNS

LR, BATCH, N, EPOCHS = 0.05, 8, 16, 2


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(2, name="out")],
        name="net",
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(N, 3)).astype("float32"), rng.normal(size=(N, 2)).astype("float32")


def _stats(g: np.ndarray) -> list[float]:
    g = g.astype(np.float64).ravel()
    return [g.mean(), np.abs(g).mean(), np.abs(g).max(), g.var(), np.abs(g).sum(), np.sqrt((g * g).sum())]


def _replay(weights: list[np.ndarray], x: np.ndarray, t: np.ndarray) -> tuple[list[dict], list[float]]:
    """Plain float64 SGD on the linear net y = (x W1 + b1) W2 + b2 with the mean squared error."""
    w1, b1, w2, b2 = (w.astype(np.float64) for w in weights)
    records, losses = [], []
    for _ in range(EPOCHS):
        for start in range(0, N, BATCH):
            xb, tb = x[start : start + BATCH].astype(np.float64), t[start : start + BATCH].astype(np.float64)
            h = xb @ w1 + b1
            y = h @ w2 + b2
            losses.append(float(((y - tb) ** 2).mean()))
            dy = 2 * (y - tb) / dy_size(y)
            grads = {"out.kernel": h.T @ dy, "out.bias": dy.sum(0)}
            dh = dy @ w2.T
            grads |= {"hidden.kernel": xb.T @ dh, "hidden.bias": dh.sum(0)}
            params = {"hidden.kernel": w1, "hidden.bias": b1, "out.kernel": w2, "out.bias": b2}
            # ||dW|| / ||W||, and ||dW|| where ||W|| = 0 (a zero-initialised bias), as in PyTorch
            ratios = {k: _ratio(LR * grads[k], params[k]) for k in params}
            records.append({k: [*_stats(grads[k]), ratios[k]] for k in params})
            w1, b1, w2, b2 = (
                params[k] - LR * grads[k] for k in ("hidden.kernel", "hidden.bias", "out.kernel", "out.bias")
            )
    return records, losses


def _ratio(delta: np.ndarray, before: np.ndarray) -> float:
    norm = np.linalg.norm(before)
    return float(np.linalg.norm(delta) / norm if norm > 0 else np.linalg.norm(delta))


def dy_size(y: np.ndarray) -> int:
    return y.size


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], keras.Model]:
    path = tmp_path_factory.mktemp("keras_run")
    model = _model()
    initial = [w.copy() for w in model.get_weights()]
    x, t = _data()
    model.fit(
        x, t, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[MonitorCallback(path)]
    )
    return path, initial, model


def test_gradient_statistics_equal_a_float64_replay(run: tuple[Path, list[np.ndarray], keras.Model]) -> None:
    path, initial, _ = run
    _assert_replayed(path, initial)
    frame = open_run(path).scalars()
    layers = frame.drop_duplicates("param").set_index("param")
    assert layers.loc["hidden.kernel", "layer_id"] == 0 and layers.loc["out.bias", "layer"] == "out"


@pytest.mark.parametrize(
    "path_kind, compile_options, dtype, every",
    [
        ("host-aside", {"steps_per_execution": 3}, "float32", 1),  # three updates between reads
        ("host-aside", {"run_eagerly": True}, "float32", 1),
        ("host-aside", {}, "float64", 1),
        ("host-inline", {"steps_per_execution": 3}, "float32", 1),
        ("host-inline", {}, "float32", 1),
        ("host-beside", {"steps_per_execution": 3}, "float32", 1),
        ("host-beside", {"run_eagerly": True}, "float32", 1),
        ("host-beside", {}, "float64", 1),
        ("host-beside", {}, "float32", 2),
        ("tf-ops", {}, "float32", 1),
        ("tf-ops", {"steps_per_execution": 3}, "float32", 1),
        ("host-aside", {}, "float32", 2),
        ("host-aside", {"steps_per_execution": 3}, "float32", 3),
        ("host-aside", {"run_eagerly": True}, "float32", 3),
        ("tf-ops", {}, "float32", 2),
        ("tf-ops", {"steps_per_execution": 3}, "float32", 3),
    ],
)
def test_every_capture_path_equals_the_float64_replay(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path_kind: str,
    compile_options: dict,
    dtype: str,
    every: int,
) -> None:
    """The host kernels (one numpy_function per step; the ratio pass on the writer thread where a
    core is spare, else in the step: after the statistics, or beside them on the host worker)
    and the TF ops (XLA, no kernels) store the same replayed
    numbers, also with steps_per_execution > 1 (aside, the later updates come before the earlier
    steps' ratio passes: TF copies on write) and eagerly; float64 variables take the kernels'
    float64 path. With ``every=k`` only steps 0, k, 2k, ... are stored, each with the ratio of its
    own update (the snapshot taken on the step before it; k=3 with 4 steps: a snapshot step that
    is itself preceded by a skipped one)."""
    from bbdecoder.keras import monitor as keras_monitor
    from bbdecoder.keras import monitor_capture

    if path_kind == "tf-ops":
        monkeypatch.setattr(keras_monitor, "host_kernels", lambda: False)
    elif not keras_monitor.host_kernels():
        pytest.skip("the fused kernels are not built")
    aside, beside = path_kind == "host-aside", path_kind == "host-beside"
    monkeypatch.setattr(monitor_capture, "spare_core", lambda: aside)
    monkeypatch.setattr(monitor_capture, "pair_passes", lambda: beside)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        model = _model()
    finally:
        keras.config.set_dtype_policy(policy)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", **compile_options)
    initial = [w.copy() for w in model.get_weights()]
    x, t = _data()
    monitor = MonitorCallback(tmp_path, every=every)
    model.fit(x, t, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[monitor])
    host = monitor._capture.host if monitor._capture is not None else None
    assert (host is not None) == path_kind.startswith("host")
    assert host is None or host.aside == (aside and every == 1)  # every > 1: both passes in the step
    assert host is None or (host.beside is not None) == beside
    assert host is None or not host.after  # every pass ran, no view of TF's buffers is kept
    _assert_replayed(tmp_path, initial, every=every)


def test_host_and_tf_op_captures_agree_on_zoo_patterns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An embedding (sparse ``IndexedSlices`` gradients, made dense for the kernels), LayerNorm,
    a fused-GELU convolution, BatchNormalization (non-trainable moving statistics), AdamW and the
    activation probes: both captures store the same rows and numbers (float64 sums against TF's
    float32 ones: the mean compared against mean |g|, whose sums do not cancel)."""
    from bbdecoder.keras import monitor as keras_monitor

    if not keras_monitor.host_kernels():
        pytest.skip("the fused kernels are not built")

    def zoo_model() -> keras.Model:
        keras.utils.set_random_seed(0)
        tokens = keras.Input((6,), dtype="int32")
        x = keras.layers.Embedding(50, 8, name="emb")(tokens)
        x = keras.layers.LayerNormalization(name="ln")(x)
        x = keras.layers.Conv1D(4, 3, activation="gelu", name="conv")(x)
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
        model = keras.Model(tokens, keras.layers.Dense(3, name="head")(x))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss=loss)
        return model

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, size=(64, 6)), rng.integers(0, 3, size=(64,))
    frames = {}
    for kind in ("host", "tf-ops"):
        if kind == "tf-ops":
            monkeypatch.setattr(keras_monitor, "host_kernels", lambda: False)
        monitor = MonitorCallback(tmp_path / kind, activations=True)
        zoo_model().fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
        assert (monitor._capture is not None and monitor._capture.host is not None) == (kind == "host")
        frames[kind] = open_run(tmp_path / kind).scalars().set_index(["step", "layer", "param", "stat"]).value
    host, tf_ops = frames["host"], frames["tf-ops"].reindex(frames["host"].index)
    assert host.index.is_unique and host.index.sort_values().equals(frames["tf-ops"].index.sort_values())
    assert {"emb.embeddings", "bn.gamma", "conv.kernel"} <= set(host.index.get_level_values("param"))
    assert set(host.xs("", level="param").index.get_level_values("layer")) == {"conv"}  # the GELU output
    np.testing.assert_array_equal(host.isna(), tf_ops.isna())  # e.g. no saturation test for GELU
    mean_abs = host.xs("mean_abs", level="stat")
    for (step, layer, param, stat), value in host.dropna().items():
        scale = mean_abs[(step, layer, param)] if stat == "mean" else abs(value)
        assert abs(value - tf_ops[(step, layer, param, stat)]) <= 2e-6 * scale + 1e-12, (step, param, stat)


def test_a_late_ratio_pass_measures_its_own_step() -> None:
    """With one slot, the next step's row can be written before the writer thread runs the
    earlier step's ratio pass: each pass still compares its own step's weights (float64 oracle)."""
    from bbdecoder.keras.monitor_host import RATIO, HostStep, host_kernels

    if not host_kernels():
        pytest.skip("the fused kernels are not built")
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(6, 4)).astype("float32")
    w1 = (w0 + 0.1 * rng.normal(size=w0.shape)).astype("float32")
    w2 = (w1 + 0.2 * rng.normal(size=w0.shape)).astype("float32")
    grad = rng.normal(size=w0.shape).astype("float32")
    host = HostStep(1, 1, gradients=True, weights=True, aside=True)
    host.ratios.add({0: w0})
    loss, one = np.float32(1.0), np.float32(1.0)
    host.record([0], 1, loss, one, grad, w1)
    first = host.table[0].copy()
    host.record([0], 1, loss, one, grad, w2)  # step 1 rewrites the slot before step 0's pass
    second = host.table[0].copy()
    host.measure(0, first)
    host.measure(1, second)
    for row, (before, after) in ((first, (w0, w1)), (second, (w1, w2))):
        b, a = before.astype(np.float64), after.astype(np.float64)
        assert row[0, RATIO] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-6)
    assert not host.after


def test_the_ratio_pass_beside_the_statistics_gives_the_inline_bits_and_its_errors() -> None:
    """``beside``: the ratio pass on another thread while the statistics run, the same table to
    the bit as one after the other; an error of the pass is raised by ``record`` itself."""
    from bbdecoder.keras.monitor_host import HostStep, host_kernels

    if not host_kernels():
        pytest.skip("the fused kernels are not built")
    rng = np.random.default_rng(8)
    w0, grad = rng.normal(size=(300, 70)).astype("float32"), rng.normal(size=(300, 70)).astype("float32")
    steps = [(w0 + 0.01 * k * rng.normal(size=w0.shape)).astype("float32") for k in range(1, 4)]
    tables = {}
    with ThreadPoolExecutor(1) as worker:
        for beside in (None, worker.submit):
            host = HostStep(1, 3, gradients=True, weights=True, aside=False, beside=beside)
            host.ratios.add({0: w0})
            for w in steps:
                host.record([0], 1, np.float32(1.0), np.float32(1.0), grad, w)
            tables[beside is None] = host.table.copy()
        np.testing.assert_array_equal(tables[True], tables[False])
        assert np.isfinite(tables[True]).all()
        host = HostStep(1, 1, gradients=True, weights=True, aside=False, beside=worker.submit)
        host.ratios.add({0: w0})
        with pytest.raises(ValueError, match="differ in dtype or size"):
            host.record([0], 1, np.float32(1.0), np.float32(1.0), grad, w0[:10])


def _assert_replayed(path: Path, initial: list[np.ndarray], rel: float = 2e-5, every: int = 1) -> None:
    expected, losses = _replay(initial, *_data())
    frame = open_run(path).scalars()
    assert list(frame.columns) == SCALAR_COLUMNS
    names = ["mean", "mean_abs", "max_abs", "var", "l1", "l2", "update_ratio"]
    assert sorted(frame.stat.unique()) == sorted(
        [
            *names,
            "weight_mean",
            "weight_std",
            "weight_l2",
            "weight_q01",
            "weight_q25",
            "weight_q50",
            "weight_q75",
            "weight_q99",
        ]
    )
    recorded = list(range(0, EPOCHS * N // BATCH, every))
    for stat in names:
        assert sorted(frame[frame.stat == stat].step.unique()) == recorded, stat
    for step in recorded:
        for param, values in expected[step].items():
            got = frame[(frame.step == step) & (frame.param == param)].set_index("stat").value
            for stat, want in zip(names, values, strict=True):
                scale = abs(want) if stat != "mean" else expected[step][param][1]  # mean: vs mean |g|
                assert abs(got[stat] - want) <= rel * scale + 1e-12, (step, param, stat, got[stat], want)
    steps = open_run(path).steps()
    assert steps.step.tolist() == recorded
    np.testing.assert_allclose(steps.loss, [losses[s] for s in recorded], rtol=max(rel, 1e-5) / 2)


def test_epoch_aggregates_and_weight_statistics(run: tuple[Path, list[np.ndarray], keras.Model]) -> None:
    path, _, model = run
    reader = open_run(path)
    assert reader.epochs() == [0, 1]
    scalars = reader.scalars()
    l2 = scalars[scalars.stat == "l2"]
    epochs = reader.epoch_scalars()
    for epoch in (0, 1):
        per_step = l2[(l2.epoch == epoch) & (l2.param == "out.kernel")].value
        agg = epochs[(epochs.epoch == epoch) & (epochs.param == "out.kernel") & (epochs.stat == "l2")]
        assert agg[agg["agg"] == "mean"].value.item() == pytest.approx(per_step.mean(), rel=1e-12)
        assert agg[agg["agg"] == "var"].value.item() == pytest.approx(
            per_step.var(ddof=0), rel=1e-9, abs=1e-15
        )
    final = dict(
        zip(["hidden.kernel", "hidden.bias", "out.kernel", "out.bias"], model.get_weights(), strict=True)
    )
    last = scalars[scalars.epoch == 1]
    for name, w in final.items():
        got = last[last.param == name].set_index("stat").value
        w64 = w.astype(np.float64).ravel()
        assert got["weight_mean"] == pytest.approx(w64.mean(), abs=1e-7)
        assert got["weight_std"] == pytest.approx(w64.std(), rel=1e-6)
        assert got["weight_q50"] == pytest.approx(np.quantile(w64, 0.5), rel=1e-6)
    hist = reader.histograms()
    one = hist[(hist.epoch == 1) & (hist.param == "out.kernel")]
    assert one["count"].sum() == final["out.kernel"].size


def test_model_and_optimizer_end_untouched(tmp_path: Path) -> None:
    plain, watched = _model(), _model()
    x, t = _data()
    plain.fit(x, t, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    watched.fit(
        x,
        t,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[MonitorCallback(tmp_path, layers="out")],
    )
    for a, b in zip(plain.get_weights(), watched.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # recording does not change training
    assert "apply" not in vars(watched.optimizer) and "scale_loss" not in vars(watched.optimizer)
    assert watched.train_function is None
    assert set(open_run(tmp_path).scalars().param) == {"out.kernel", "out.bias"}


def test_gradient_statistics_function_and_names() -> None:
    g = np.array([[1.0, -3.0], [0.5, 2.0]], dtype="float32")
    np.testing.assert_allclose(gradient_statistics(g).numpy(), _stats(g), rtol=1e-6)
    rng = np.random.default_rng(0)
    centred = rng.normal(size=(300, 200)).astype("float32")
    np.testing.assert_allclose(gradient_statistics(centred).numpy(), _stats(centred), rtol=1e-5)
    # mean^2 >> var: the one-pass E[g^2] - mean^2 would lose every digit; the two-pass branch runs
    offset = (1000 + rng.normal(size=(300, 200))).astype("float32")
    got, want = gradient_statistics(offset).numpy(), _stats(offset)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    one_pass = np.mean(offset * offset, dtype=np.float32) - np.mean(offset, dtype=np.float32) ** 2
    assert abs(one_pass - want[3]) > 100 * abs(got[3] - want[3])
    np.testing.assert_allclose(gradient_statistics(offset, fused=False).numpy(), want, rtol=2e-5)  # XLA's
    inner = keras.Sequential([keras.layers.Dense(2, name="conv")], name="block")
    outer = keras.Sequential([keras.Input((2,)), inner, keras.layers.Dense(1, name="head")], name="top")
    names = qualified_layer_names(outer)
    from bbdecoder.keras.layers import leaf_layers

    assert [names[id(layer)] for layer in leaf_layers(outer)] == ["block.conv", "head"]
    assert names[id(inner)] == "block"


def test_the_finiteness_flag_is_read_from_the_statistics() -> None:
    from bbdecoder.keras.monitor_tfops import _all_finite, finite_from_statistics

    big = np.full(4096, 3e35, dtype="float32")  # finite, but its L1 overflows float32
    cases = {
        "finite": np.array([1.0, -2.0, 0.5], "float32"),
        "overflowing L1": big,
        "+inf": np.array([1.0, np.inf, 2.0], "float32"),
        "-inf": np.array([-np.inf, 1.0], "float32"),
        "both infinities": np.array([np.inf, -np.inf], "float32"),
        "nan": np.array([1.0, np.nan], "float32"),
        "nan and inf": np.array([np.nan, np.inf, 1.0], "float32"),
        "empty": np.zeros(0, "float32"),
    }
    for name, g in cases.items():
        stats = gradient_statistics(tf.constant(g))
        got = float(finite_from_statistics(stats).numpy())
        assert got == float(_all_finite(tf.constant(g)).numpy()) == float(np.isfinite(g).all()), name
    stats = gradient_statistics(tf.constant(big)).numpy()
    assert np.isinf(stats[4]) and np.isfinite(stats[2])  # the statistic overflows, the flag does not


def test_host_statistics_of_nonfinite_gradients_equal_pytorchs() -> None:
    """The rows the kernel hands to the exact redo (NaN, +-Inf, ill-conditioned) get the PyTorch
    monitor's values for the same gradient: one redo for both frameworks."""
    import torch

    from bbdecoder.keras.monitor_host import host_kernels, host_statistics
    from bbdecoder.monitor.grad_stats import grad_statistics

    if not host_kernels():
        pytest.skip("the fused kernels are not built")
    cases = [
        np.array([np.inf, 1.0, -2.0], "float32"),
        np.array([-np.inf, 1.0], "float32"),
        np.array([1.0, np.nan, 3.0], "float32"),
        (1000 + np.random.default_rng(0).normal(size=64)).astype("float32"),  # the two-pass variance
    ]
    host = host_statistics(*cases)
    want = grad_statistics([torch.from_numpy(g) for g in cases]).numpy()
    np.testing.assert_allclose(host, want, rtol=1e-6, equal_nan=True)
    assert host[0, 2] == host[1, 2] == np.inf and np.isnan(host[2, 4])  # what the finiteness flag reads


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to record"):
        MonitorCallback(tmp_path, gradients=False, weights=False)
    model = _model()
    x, t = _data()
    with pytest.raises(ValueError, match="no leaf layer matches 'nope'"):
        model.fit(x, t, epochs=1, verbose=0, callbacks=[MonitorCallback(tmp_path, layers="nope")])
    with pytest.raises(ValueError, match="no leaf layer matches 7"):
        model.fit(x, t, epochs=1, verbose=0, callbacks=[MonitorCallback(tmp_path, activations=[0, 7])])
    with pytest.raises(ValueError, match="saturation_eps must be in"):
        MonitorCallback(tmp_path, saturation_eps=0.7)
    for every in (0, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            MonitorCallback(tmp_path, every=every)
    assert "apply" not in vars(model.optimizer) and "train_step" not in vars(model)


@pytest.mark.parametrize("path_kind", ["host", "tf-ops"])
def test_every_counts_the_stores_step_numbers_across_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_kind: str
) -> None:
    """Two one-epoch fits into one store with ``every=3``: steps 0 and 3 are recorded (the second fit
    starts at step 2, so its first step only takes the snapshot); an epoch without a recorded step
    still gets its weight statistics; the numbers are those of one two-epoch replay."""
    from bbdecoder.keras import monitor as keras_monitor

    if path_kind == "tf-ops":
        monkeypatch.setattr(keras_monitor, "host_kernels", lambda: False)
    elif not keras_monitor.host_kernels():
        pytest.skip("the fused kernels are not built")
    model = _model()
    initial = [w.copy() for w in model.get_weights()]
    x, t = _data()
    for _ in range(EPOCHS):
        callback = MonitorCallback(tmp_path, every=3)
        model.fit(x, t, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    _assert_replayed(tmp_path, initial, every=3)
    run = open_run(tmp_path)
    assert run.meta()["record_every"] == "3"
    weights = run.scalars().query("stat == 'weight_l2'")
    assert sorted(set(zip(weights.epoch, weights.step, strict=True))) == [(0, 1), (1, 3)]
    np.testing.assert_allclose(
        weights[weights.epoch == 1].set_index("param").value.sort_index(),
        sorted_norms(model),
        rtol=1e-6,
    )


def sorted_norms(model: keras.Model) -> list[float]:
    """``||W||`` of each variable, in the order of their stored names."""
    named = {
        f"{layer.name}.{v.name}": np.linalg.norm(v.numpy())
        for layer in model.layers
        for v in layer.trainable_weights
    }
    return [named[k] for k in sorted(named)]


# -- activations ---------------------------------------------------------------------------------
ACT_N, ACT_BATCH = 32, 8


def _act_model(*, frozen: bool) -> keras.Model:
    """Conv (fused ReLU, channel 1 planted dead by a bias of -100) -> Dense(sigmoid, weights x20, so
    driven into saturation) -> Dense head. ``frozen``: only the head trains (for exact oracles)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(4, 3, activation="relu", name="conv")
    sat = keras.layers.Dense(5, activation="sigmoid", name="sat")
    flat = keras.layers.Flatten(name="flat")(conv(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(sat(flat)), name="actnet")
    kernel, bias = conv.get_weights()
    bias[1] = -100.0
    conv.set_weights([kernel, bias])
    sat.set_weights([sat.get_weights()[0] * 20, sat.get_weights()[1]])
    conv.trainable = sat.trainable = not frozen
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _act_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.normal(size=(ACT_N, 6, 6, 2)).astype("float32"), rng.normal(size=(ACT_N, 1)).astype("float32")


def _oracle_forward(model: keras.Model, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """float64 numpy forward of the frozen layers: ``{layer: (pre-activation, output)}``."""
    kernel, bias = (w.astype(np.float64) for w in model.get_layer("conv").get_weights())
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (3, 3), axis=(1, 2))
    conv_pre = np.einsum("nijcab,abco->nijo", windows, kernel) + bias  # valid 3x3 convolution
    conv_out = np.maximum(conv_pre, 0)
    sat_kernel, sat_bias = (w.astype(np.float64) for w in model.get_layer("sat").get_weights())
    sat_pre = conv_out.reshape(len(x), -1) @ sat_kernel + sat_bias
    return {"conv": (conv_pre, conv_out), "sat": (sat_pre, 0.5 * (1 + np.tanh(sat_pre / 2)))}  # sigmoid


def _oracle_epoch(model: keras.Model, batches: list[np.ndarray], eps: float = 1e-3) -> dict[str, dict]:
    outs = [_oracle_forward(model, xb) for xb in batches]
    result = {}
    for name, is_saturated in (("conv", lambda y: y == 0), ("sat", lambda y: (y < eps) | (y > 1 - eps))):
        ys = [o[name][1] for o in outs]
        channels = [y.reshape(-1, y.shape[-1]) for y in ys]
        cmax = np.max([c.max(0) for c in channels], axis=0)
        result[name] = {
            "dead": np.flatnonzero(cmax <= 0).tolist(),
            "dead_count": float((cmax <= 0).sum()),
            "dead_fraction": float((cmax <= 0).mean()),
            "saturated_fraction": sum(is_saturated(y).sum() for y in ys) / sum(y.size for y in ys),
            "channel_var": float(np.mean([c.mean(0).var() for c in channels])),
        }
    return result


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("path_kind", ["host-aside", "host-inline", "tf-ops"])
def test_activation_statistics_equal_a_numpy_oracle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_kind: str, every: int
) -> None:
    """``every=2``: the probes see the forwards of the recorded steps only (each epoch's first).
    ``host-aside``: the kernel reads each output on the host worker (a spare core)."""
    from bbdecoder.keras import monitor as keras_monitor

    if path_kind == "tf-ops":
        monkeypatch.setattr(keras_monitor, "host_kernels", lambda: False)
    elif not keras_monitor.host_kernels():
        pytest.skip("the fused kernels are not built")
    monkeypatch.setattr(keras_monitor, "spare_core", lambda: path_kind == "host-aside")
    if path_kind == "host-aside":  # slow updates: the state must be read after they are all done
        from bbdecoder.keras.monitor_host import HostProbe

        update = HostProbe.__call__
        monkeypatch.setattr(HostProbe, "__call__", lambda probe, y: (time.sleep(0.02), update(probe, y))[1])
    model = _act_model(frozen=True)
    x, t = _act_data()
    data = tf.data.Dataset.from_tensor_slices((x, t)).batch(ACT_BATCH).repeat()  # new samples each epoch
    monitor = MonitorCallback(
        tmp_path, activations=["conv", "sat"], gradients=False, weights=False, every=every
    )
    validation = (x * 1000, t)  # would revive the dead channel and change every statistic if counted
    model.fit(
        data,
        epochs=2,
        steps_per_epoch=2,
        shuffle=False,
        verbose=0,
        validation_data=validation,
        callbacks=[monitor],
    )
    assert _oracle_forward(model, validation[0])["conv"][1][..., 1].max() > 0
    hosts = [p._host for p in monitor._activations.probes.values()]
    assert all((h is not None) == (path_kind != "tf-ops") for h in hosts)
    assert all(h is None or (h.aside is not None) == (path_kind == "host-aside") for h in hosts)
    assert not [t for t in threading.enumerate() if t.name.startswith("bbdecoder-host")]  # stopped

    # float32 and float64 agree on every threshold decision only away from the thresholds
    pre = _oracle_forward(model, x)
    live = np.delete(pre["conv"][0], 1, axis=-1)
    assert np.abs(live).min() > 1e-4 and np.abs(pre["conv"][0][..., 1]).min() > 50
    sat_out = pre["sat"][1]
    assert min(np.abs(sat_out - 1e-3).min(), np.abs(sat_out - (1 - 1e-3)).min()) > 1e-5
    frame = open_run(tmp_path).scalars()
    assert set(frame.param) == {""}
    for epoch in (0, 1):
        samples = x[epoch * 2 * ACT_BATCH : (epoch + 1) * 2 * ACT_BATCH]
        expected = _oracle_epoch(model, [samples[:ACT_BATCH], samples[ACT_BATCH:]][::every])
        got = frame[frame.epoch == epoch]
        assert set(got.step) == {epoch * 2 + 1}  # stored at the epoch's last step, as in PyTorch
        for layer, want in expected.items():
            values = got[got.layer == layer].set_index("stat").value
            assert values["dead_count"] == want["dead_count"]
            assert values["dead_fraction"] == pytest.approx(want["dead_fraction"], abs=1e-12)
            assert values["saturated_fraction"] == pytest.approx(want["saturated_fraction"], abs=1e-12)
            assert values["channel_var"] == pytest.approx(want["channel_var"], rel=1e-5)
        assert expected["conv"]["dead"] == [1] and expected["sat"]["dead"] == []
        assert 0.2 < expected["sat"]["saturated_fraction"] < 0.9  # the planted saturation is real
    assert monitor.dead_units == {"conv": [1], "sat": []}
    events = open_run(tmp_path).events("dead_units")
    assert list(events.layer) == ["conv", "conv"] and events.data.iloc[0] == {"channels": [1]}
    assert "1 of 4 units dead in [0] conv" in events.message.iloc[0]


def _torch_run(path: Path) -> None:
    """One recorded step and epoch of a PyTorch conv -> ReLU -> flatten -> linear -> sigmoid net."""
    import torch
    from torch import nn

    from bbdecoder.monitor import Analyzer

    torch_model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 1), nn.Sigmoid())
    analyzer = Analyzer(torch_model, path, activations=True)
    analyzer.backward_propagation(analyzer.forward_propagation(torch.randn(4, 2, 6, 6)).sum())
    analyzer.end_epoch()
    analyzer.close()


def test_watching_leaves_training_bit_identical_and_stores_pytorch_names(tmp_path: Path) -> None:
    x, t = _act_data()
    plain, watched = _act_model(frozen=False), _act_model(frozen=False)
    plain.fit(x, t, batch_size=ACT_BATCH, epochs=2, shuffle=False, verbose=0)
    monitor = MonitorCallback(tmp_path / "keras", activations=True)
    watched.fit(x, t, batch_size=ACT_BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    for a, b in zip(plain.get_weights(), watched.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert monitor.dead_units["conv"] == [1]  # the planted unit gets no gradient and stays dead
    assert "apply" not in vars(watched.optimizer) and "train_step" not in vars(watched)
    assert not any("call" in vars(layer) for layer in watched.layers)
    assert watched.train_function is None

    _torch_run(tmp_path / "torch")
    torch_run, keras_run = open_run(tmp_path / "torch").scalars(), open_run(tmp_path / "keras").scalars()
    assert list(keras_run.columns) == list(torch_run.columns) == SCALAR_COLUMNS
    assert set(keras_run.stat) == set(torch_run.stat)
    torch_act, keras_act = torch_run[torch_run.param == ""], keras_run[keras_run.param == ""]
    assert set(keras_act.stat) == set(torch_act.stat) == set(ACTIVATION_STATS)
    # activations=True: the activation outputs (the fused ReLU, the sigmoid), as PyTorch's ReLU, Sigmoid
    assert set(keras_act.layer) == {"conv", "sat"} and len(set(torch_act.layer)) == 2
    assert keras_act.groupby("layer").epoch.nunique().eq(2).all()  # one row per layer, stat and epoch
    for keras_layer, torch_id in (("conv", 1), ("sat", 4)):  # dead units on the rectifier only
        torch_stats = set(torch_act[torch_act.layer_id == torch_id].stat)
        assert set(keras_act[keras_act.layer == keras_layer].stat) == torch_stats, keras_layer
    assert monitor.dead_units == {"conv": [1]}
    torch_events, keras_events = open_run(tmp_path / "torch").events(), open_run(tmp_path / "keras").events()
    assert list(keras_events.columns) == list(torch_events.columns)
    assert set(keras_events.kind) == {"dead_units"}


def test_activations_true_watches_the_activation_outputs_as_pytorch_does() -> None:
    from bbdecoder.keras.activation_kinds import activation_kind, watched_layers

    kinds = {
        "relu_layer": (keras.layers.ReLU(), "rectifier"),
        "leaky": (keras.layers.LeakyReLU(), "rectifier"),
        "prelu": (keras.layers.PReLU(), "rectifier"),
        "elu": (keras.layers.ELU(), "rectifier"),
        "gelu": (keras.layers.Activation("gelu"), "rectifier"),
        "swish": (keras.layers.Dense(3, activation="swish"), "rectifier"),
        "conv_relu": (keras.layers.Conv2D(2, 1, activation="relu"), "rectifier"),
        "tanh": (keras.layers.Activation("tanh"), "activation"),
        "sigmoid": (keras.layers.Dense(3, activation="sigmoid"), "activation"),
        "softmax": (keras.layers.Dense(3, activation="softmax"), None),
        "softmax_layer": (keras.layers.Softmax(), None),
        "linear": (keras.layers.Dense(3), None),
        "dropout": (keras.layers.Dropout(0.5), None),
        "flatten": (keras.layers.Flatten(), None),
        "lstm": (keras.layers.LSTM(2, activation="tanh"), None),  # its output is not tanh's alone
    }
    for name, (layer, want) in kinds.items():
        assert activation_kind(layer) == want, name

    model = _act_model(frozen=False)  # conv (fused relu), flat, sat (sigmoid), head (linear)
    watched = {layer.name: dead for _, layer, dead in watched_layers(model, True)}
    assert watched == {"conv": True, "sat": False}
    named = {layer.name: dead for _, layer, dead in watched_layers(model, ["head", "flat"])}
    assert named == {"flat": True, "head": True}  # a named layer counts dead units
    assert watched_layers(model, None) == watched_layers(model, False) == []
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="only")])
    with pytest.warns(UserWarning, match="found no activation layer"):
        assert watched_layers(plain, True) == []


@pytest.mark.slow  # XLA compiles for about 12 s on 2 CPU cores
def test_bit_identical_under_xla(tmp_path: Path) -> None:
    x, t = _act_data()
    weights = []
    for callbacks in ([], [MonitorCallback(tmp_path, activations=True)]):
        model = _act_model(frozen=False)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=True)
        model.fit(x, t, batch_size=ACT_BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert open_run(tmp_path).events("dead_units").layer.tolist()[0] == "conv"


@pytest.mark.parametrize(
    "shape, axis, layer",
    [
        ((4, 5, 6, 3), -1, keras.layers.ReLU()),  # channels last
        ((4, 3, 5, 6), 1, keras.layers.Activation("sigmoid")),  # channels first: (outer, C, inner)
        ((4, 7, 8), -1, keras.layers.Activation("tanh")),  # (N, L, D)
        ((9,), -1, keras.layers.ReLU(max_value=1.0)),  # one channel
        ((4, 6), 0, keras.layers.Dense(6)),  # no saturation test
    ],
)
def test_the_host_probe_keeps_the_tf_probes_state(
    shape: tuple[int, ...], axis: int, layer: keras.Layer
) -> None:
    from bbdecoder.keras import monitor_host
    from bbdecoder.keras.activation_kinds import activation_name
    from bbdecoder.keras.monitor_activations import ActivationProbe

    if not monitor_host.host_kernels():
        pytest.skip("the fused kernels are not built")
    rng = np.random.default_rng(3)
    outputs = [rng.normal(size=shape).astype("float32") for _ in range(3)]
    outputs[1][(0,) * len(shape)] = 0.0  # an exact zero: saturated for a ReLU
    kind = activation_name(layer)
    if kind == "tanh":  # saturated and not: |y| > 1 - eps for about a third
        outputs = [np.tanh(4 * y) for y in outputs]
    elif kind == "sigmoid":
        outputs = [1 / (1 + np.exp(-8 * y)) for y in outputs]
    if isinstance(layer, keras.layers.ReLU):
        outputs = [np.clip(y, 0, layer.max_value) for y in outputs]  # what a ReLU can return
    states = {}
    for path in ("host", "host-aside", "tf"):
        host, worker = path != "tf", ThreadPoolExecutor(1)  # aside: the updates on another thread
        aside = worker.submit if path == "host-aside" else None
        probe = ActivationProbe(0, "layer", layer, 0.0, 1e-3, axis, host=host, aside=aside)
        step = tf.function(probe.update)
        for y in outputs:
            step(tf.constant(y.astype("float32")))
        worker.shutdown(wait=True)
        states[path] = [np.asarray(t, dtype=np.float64) for t in probe.state()]
        assert (probe._host is not None) == host
    for a, b in zip(states["host"], states["host-aside"], strict=True):
        np.testing.assert_array_equal(a, b)  # the same bits on either thread
    host_state, tf_state = states["host"], states["tf"]
    np.testing.assert_array_equal(host_state[0], tf_state[0])  # per-channel maximum
    np.testing.assert_array_equal(np.concatenate(host_state[1:3]), np.concatenate(tf_state[1:3]))  # counts
    assert (host_state[1][0] > 0) == (kind is not None or isinstance(layer, keras.layers.ReLU))
    np.testing.assert_allclose(host_state[3], tf_state[3], rtol=1e-5)  # summed channel variance
    assert float(host_state[4][0]) == float(tf_state[4][0]) == len(outputs)


def test_saturation_tests_match_numpy() -> None:
    from bbdecoder.keras.activation_kinds import saturation_test

    y = np.array([-7.0, -1.0, -0.9995, -0.5, 0.0, 0.0004, 0.5, 0.9996, 1.0, 6.0, 7.0], dtype="float32")
    eps = 1e-3
    cases = {
        "sigmoid": (keras.layers.Dense(2, activation="sigmoid"), (y < eps) | (y > 1 - eps)),
        "tanh": (keras.layers.Activation("tanh"), np.abs(y) > 1 - eps),
        "relu": (keras.layers.Conv2D(1, 1, activation="relu"), y == 0),
        "relu6": (keras.layers.Activation("relu6"), (y <= 0) | (y >= 6)),
        "ReLU(6)": (keras.layers.ReLU(max_value=6.0), (y == 0) | (y >= 6)),
        "hard_sigmoid": (keras.layers.Activation("hard_sigmoid"), (y <= 0) | (y >= 1)),
    }
    for name, (layer, want) in cases.items():
        test = saturation_test(layer, eps)
        assert test is not None, name
        np.testing.assert_array_equal(test(tf.constant(y)).numpy(), want, err_msg=name)
    for layer in (keras.layers.Dense(2), keras.layers.LeakyReLU(), keras.layers.LSTM(2, activation="tanh")):
        assert saturation_test(layer, eps) is None, layer


# -- non-finite gradients and failures ------------------------------------------------------------
class _Poison(keras.layers.Layer):
    """y = x * s, whose backward returns NaN for s and for x (so every earlier layer gets NaN too)."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.s = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="s")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        @tf.custom_gradient
        def scale(x: tf.Tensor, s: tf.Tensor) -> tuple[tf.Tensor, object]:
            def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                nan = tf.constant(np.nan, dy.dtype)
                return dy * nan, tf.fill(tf.shape(s), nan)

            return x * s, grad

        return scale(x, tf.convert_to_tensor(self.s))


class _Shuffled(keras.Model):
    """Declared a, mid, b, head (leaf IDs 0..3) but called a -> b -> mid -> head."""

    def __init__(self) -> None:
        super().__init__(name="shuffled")
        self.a = keras.layers.Dense(3, name="a")
        self.mid = _Poison(name="mid")
        self.b = keras.layers.Dense(3, name="b")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return self.head(self.mid(self.b(self.a(x))))


def test_nonfinite_gradient_is_attributed_to_the_first_layer_in_backward_order(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = _Shuffled()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, t = _data()
    with pytest.raises(ValueError, match=r"needs a built model.*model.build\(input_shape\)"):
        model.fit(x, t[:, :1], epochs=1, verbose=0, callbacks=[MonitorCallback(tmp_path / "unbuilt")])
    model(x[:1])  # builds every layer
    with pytest.warns(
        NonFiniteGradientWarning, match=r"first in backward order is layer \[1\] mid \(mid\.s\)"
    ):
        model.fit(x[:4], t[:4, :1], batch_size=4, epochs=1, verbose=0, callbacks=[MonitorCallback(tmp_path)])
    events = open_run(tmp_path).events("nonfinite_grad")
    assert len(events) == 1
    event = events.iloc[0]
    assert (event.step, event.layer_id, event.layer, event.param) == (0, 1, "mid", "mid.s")
    # a and b (leaf IDs 0 and 2) are affected too: neither the lowest nor the highest ID is the answer
    assert sorted(event.data["affected"]) == ["a.bias", "a.kernel", "b.bias", "b.kernel", "mid.s"]


def test_loss_scaled_statistics_are_unscaled_and_overflow_does_not_warn(
    run: tuple[Path, list[np.ndarray], keras.Model], tmp_path: Path
) -> None:
    plain_path, _, _ = run
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR)), loss="mse")
    x, t = _data()
    model.fit(
        x, t, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[MonitorCallback(tmp_path)]
    )
    plain, scaled = open_run(plain_path).scalars("l2"), open_run(tmp_path).scalars("l2")
    np.testing.assert_allclose(scaled.value, plain.value, rtol=1e-6)  # not multiplied by the 32768 scale

    keras.utils.set_random_seed(0)
    poisoned = _Shuffled()
    poisoned(x[:1])
    poisoned.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteGradientWarning)
        poisoned.fit(
            x[:4], t[:4, :1], batch_size=4, verbose=0, callbacks=[MonitorCallback(tmp_path / "overflow")]
        )
    assert open_run(tmp_path / "overflow").events("nonfinite_grad").param.tolist() == ["mid.s"]
    assert all(np.isfinite(w).all() for w in poisoned.get_weights())  # the step was skipped


class _Guard(keras.layers.Layer):
    def call(self, x: tf.Tensor) -> tf.Tensor:
        with tf.control_dependencies([tf.debugging.assert_less(tf.reduce_max(x), 100.0)]):
            return tf.identity(x)


def _guarded_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), _Guard(name="guard"), keras.layers.Dense(2, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


def _assert_restored(model: keras.Model) -> None:
    assert not {"apply", "scale_loss"} & set(vars(model.optimizer))
    assert "train_step" not in vars(model)
    assert not any("call" in vars(layer) for layer in model.layers)
    assert model.train_function is None


def test_a_failing_train_step_restores_the_model(tmp_path: Path) -> None:
    model = _guarded_model()
    x, t = _data()
    bad = x.copy()
    bad[BATCH + 1] = 1000.0  # the second batch trips the assertion inside the compiled step
    monitor = MonitorCallback(tmp_path, activations=["guard", "out"])
    with pytest.raises(tf.errors.InvalidArgumentError):
        model.fit(bad, t, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    _assert_restored(model)
    assert monitor.writer is None
    reader = open_run(tmp_path)
    assert list(reader.steps().step) == [0] and "InvalidArgumentError" in reader.meta()["aborted"]
    model.fit(x, t, batch_size=BATCH, epochs=1, verbose=0)  # Keras' plain step again, nothing recorded
    assert list(open_run(tmp_path).steps().step) == [0]


def test_an_error_outside_the_step_is_cleaned_by_close_or_the_next_monitor(tmp_path: Path) -> None:
    class Boom(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            raise RuntimeError("boom")

    model = _guarded_model()
    x, t = _data()
    stale = MonitorCallback(tmp_path / "stale")
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, t, batch_size=BATCH, epochs=1, verbose=0, callbacks=[stale, Boom()])
    assert "apply" in vars(model.optimizer)  # Keras skipped on_train_end: still installed
    model.fit(x, t, batch_size=BATCH, epochs=1, verbose=0, callbacks=[MonitorCallback(tmp_path / "next")])
    _assert_restored(model)
    assert stale.writer is None and "finished" in open_run(tmp_path / "stale").meta()
    with pytest.raises(RuntimeError, match="boom"), MonitorCallback(tmp_path / "ctx") as monitor:
        model.fit(x, t, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor, Boom()])
    _assert_restored(model)
    assert len(open_run(tmp_path / "ctx").steps()) == N // BATCH


# -- one recorder for both frameworks ------------------------------------------------------------
TWIN_NAMES = {
    "hidden.kernel": "0.weight",
    "hidden.bias": "0.bias",
    "out.kernel": "1.weight",
    "out.bias": "1.bias",
}


def _torch_twin_run(keras_model: keras.Model, path: Path) -> None:
    """The same net, weights, data and SGD in PyTorch, recorded by the Analyzer."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from bbdecoder.monitor import Analyzer

    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        for linear, name in zip(net, ("hidden", "out"), strict=True):
            kernel, bias = keras_model.get_layer(name).get_weights()
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    x, t = (torch.from_numpy(a) for a in _data())
    with Analyzer(net, path) as analyzer:
        for _ in range(EPOCHS):
            for start in range(0, N, BATCH):
                loss = F.mse_loss(
                    analyzer.forward_propagation(x[start : start + BATCH]), t[start : start + BATCH]
                )
                optimizer.zero_grad()
                analyzer.backward_propagation(loss)
                optimizer.step()
            analyzer.end_epoch()


def test_keras_and_pytorch_twins_store_the_same_rows(tmp_path: Path) -> None:
    model = _model()
    _torch_twin_run(model, tmp_path / "torch")  # before fit: the same initial weights
    x, t = _data()
    model.fit(
        x,
        t,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[MonitorCallback(tmp_path / "keras")],
    )
    k, p = open_run(tmp_path / "keras"), open_run(tmp_path / "torch")
    keys = ["step", "epoch", "layer_id", "param", "stat"]
    ks = k.scalars().replace({"param": TWIN_NAMES}).sort_values(keys).reset_index(drop=True)
    ps = p.scalars().sort_values(keys).reset_index(drop=True)
    ps = ps[ps.layer_id >= 0].reset_index(drop=True)  # PyTorch's own extra rows (none here) aside
    assert ks[keys].equals(ps[keys])  # the same rows: steps, epochs, layers, names, statistics
    np.testing.assert_allclose(ks.value, ps.value, rtol=5e-5, atol=1e-7)
    ke, pe = (
        r.epoch_scalars()
        .replace({"param": TWIN_NAMES})
        .sort_values(["epoch", "param", "stat", "agg"])
        .reset_index(drop=True)
        for r in (k, p)
    )
    assert ke[["epoch", "layer_id", "param", "stat", "agg"]].equals(
        pe[["epoch", "layer_id", "param", "stat", "agg"]]
    )
    np.testing.assert_allclose(ke.value, pe.value, rtol=1e-3, atol=1e-9)  # variances of close values
    kh, ph = (r.weight_histograms().replace({"param": TWIN_NAMES}) for r in (k, p))
    hist_keys = ["step", "epoch", "param", "kind", "bin"]
    assert (
        kh.sort_values(hist_keys)[hist_keys]
        .reset_index(drop=True)
        .equals(ph.sort_values(hist_keys)[hist_keys].reset_index(drop=True))
    )
    assert (kh.groupby("param")["count"].sum() == ph.groupby("param")["count"].sum()).all()
    np.testing.assert_allclose(k.steps().loss, p.steps().loss, rtol=1e-5)
    assert k.events().empty and p.events().empty


@pytest.mark.parametrize("path_kind", ["host", "tf-ops"])
def test_every_with_loss_scaling_and_either_recording_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_kind: str
) -> None:
    """``every=2`` under a ``LossScaleOptimizer`` stores the unscaled statistics of steps 0 and 2 (the
    scale is read on the recorded step, inside the skipping ``tf.cond``), equal to the plain run's;
    with ``gradients=False`` or ``weights=False`` the other half is left out on the same steps."""
    from bbdecoder.keras import monitor as keras_monitor

    if path_kind == "tf-ops":
        monkeypatch.setattr(keras_monitor, "host_kernels", lambda: False)
    elif not keras_monitor.host_kernels():
        pytest.skip("the fused kernels are not built")
    x, t = _data()
    runs = {
        "plain": ({}, keras.optimizers.SGD(LR)),
        "scaled": ({}, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR))),
        "no-grads": ({"gradients": False}, keras.optimizers.SGD(LR)),
        "no-weights": ({"weights": False}, keras.optimizers.SGD(LR)),
    }
    for name, (options, optimizer) in runs.items():
        model = _model()
        model.compile(optimizer=optimizer, loss="mse")
        callback = MonitorCallback(tmp_path / name, every=2, **options)
        model.fit(x, t, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[callback])
    frames = {name: open_run(tmp_path / name).scalars() for name in runs}
    for frame in frames.values():
        per_step = frame[~frame.stat.str.startswith("weight_")]
        assert sorted(per_step.step.unique()) == [0, 2]
    plain = frames["plain"].set_index(["step", "param", "stat"]).value.sort_index()
    scaled = frames["scaled"].set_index(["step", "param", "stat"]).value.sort_index()
    np.testing.assert_allclose(scaled.to_numpy(), plain.to_numpy(), rtol=1e-6)  # not x32768
    assert not frames["no-grads"].stat.isin(["l2", "mean"]).any()
    assert frames["no-grads"].stat.eq("update_ratio").sum() == 2 * 4  # steps 0, 2; four variables
    assert not frames["no-weights"].stat.str.startswith("weight_").any()
    assert not frames["no-weights"].stat.eq("update_ratio").any()
    assert frames["no-weights"].stat.eq("l2").sum() == 2 * 4
