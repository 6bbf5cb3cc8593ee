"""The Keras monitor: stored gradient statistics and update ratios equal a float64 numpy replay of the
same training (analytic gradients of a linear two-layer net), with the PyTorch run's columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from bbdecoder.keras import keras
from bbdecoder.keras.monitor import MonitorCallback, gradient_statistics, qualified_layer_names
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
            with np.errstate(divide="ignore"):
                ratios = {k: np.linalg.norm(LR * grads[k]) / np.linalg.norm(params[k]) for k in params}
            records.append({k: [*_stats(grads[k]), ratios[k]] for k in params})
            w1, b1, w2, b2 = (
                params[k] - LR * grads[k] for k in ("hidden.kernel", "hidden.bias", "out.kernel", "out.bias")
            )
    return records, losses


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
    steps = EPOCHS * N // BATCH
    assert sorted(frame.step.unique()) == list(range(steps))
    for step in range(steps):
        for param, values in expected[step].items():
            got = frame[(frame.step == step) & (frame.param == param)].set_index("stat").value
            for stat, want in zip(names, values, strict=True):
                if np.isinf(want):  # the first update of a zero-initialised bias: ||dW|| / 0, as in PyTorch
                    assert got[stat] == want
                    continue
                scale = abs(want) if stat != "mean" else expected[step][param][1]  # mean: vs mean |g|
                assert abs(got[stat] - want) <= 2e-5 * scale + 1e-12, (step, param, stat, got[stat], want)
    np.testing.assert_allclose(open_run(path).steps().loss, losses, rtol=1e-5)
    layers = frame.drop_duplicates("param").set_index("param")
    assert layers.loc["hidden.kernel", "layer_id"] == 0 and layers.loc["out.bias", "layer"] == "out"


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
    inner = keras.Sequential([keras.layers.Dense(2, name="conv")], name="block")
    outer = keras.Sequential([keras.Input((2,)), inner, keras.layers.Dense(1, name="head")], name="top")
    names = qualified_layer_names(outer)
    from bbdecoder.keras.layers import leaf_layers

    assert [names[id(layer)] for layer in leaf_layers(outer)] == ["block.conv", "head"]
    assert names[id(inner)] == "block"


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to record"):
        MonitorCallback(tmp_path, gradients=False, weights=False)
    model = _model()
    x, t = _data()
    with pytest.raises(ValueError, match="no leaf layer matches 'nope'"):
        model.fit(x, t, epochs=1, verbose=0, callbacks=[MonitorCallback(tmp_path, layers="nope")])
