"""The Keras monitor's update ratios measured on the host (keras/monitor_ratios.py): against a
float64 oracle from the weights after every batch, equal to the in-step measure that
``steps_per_execution > 1`` keeps, zero-initialised biases as absolute update sizes, no alias of a
variable left behind (TF would copy the variable on its next update), and the cases that keep
the in-step path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from bbdecoder.keras import keras  # noqa: E402
from bbdecoder.keras._backend import tf  # noqa: E402
from bbdecoder.keras.monitor import MonitorCallback  # noqa: E402
from bbdecoder.keras.monitor_ratios import HostRatios, _alias  # noqa: E402
from bbdecoder.store import open_run  # noqa: E402

BATCH, N = 16, 96


def _model(steps_per_execution: int = 1) -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 12)).astype("float32"), rng.integers(0, 3, size=N)


class _Weights(keras.callbacks.Callback):
    """The weights after every batch, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.after: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.after.append([w.astype(np.float64) for w in self.model.get_weights()])


def _stored_ratios(path: Path) -> dict[str, np.ndarray]:
    frame = open_run(path).scalars()
    frame = frame[frame.stat == "update_ratio"].sort_values("step")
    return {param: group.value.to_numpy() for param, group in frame.groupby("param")}


def test_host_ratios_equal_a_float64_oracle_of_the_weights_after_each_batch(tmp_path: Path) -> None:
    model = _model()
    x, t = _data()
    initial = [w.astype(np.float64) for w in model.get_weights()]
    weights = _Weights()
    monitor = MonitorCallback(tmp_path)
    model.fit(x, t, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[monitor, weights])
    assert monitor._host_ratios is not None  # a CPU model, one step per batch: measured on the host
    names = ["hidden.kernel", "hidden.bias", "out.kernel", "out.bias"]
    stored = _stored_ratios(tmp_path)
    states = [initial, *weights.after]
    for k, name in enumerate(names):
        expected = []
        for before, after in zip(states, states[1:], strict=False):
            delta, norm = np.linalg.norm(after[k] - before[k]), np.linalg.norm(before[k])
            expected.append(delta / norm if norm > 0 else delta)
        # the difference is rounded to float32 (as in the PyTorch monitor), its squares summed in float64
        np.testing.assert_allclose(stored[name], expected, rtol=1e-7, atol=0)
    assert stored["hidden.bias"][0] == pytest.approx(np.linalg.norm(states[1][1]), rel=1e-9)  # zero bias


def test_host_ratios_agree_with_the_in_step_measure(tmp_path: Path) -> None:
    x, t = _data()
    runs = {}
    for k in (1, 2):  # two steps per batch: the ratios stay in the train step
        monitor = MonitorCallback(tmp_path / str(k))
        _model(k).fit(x, t, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        assert (monitor._host_ratios is None) == (k == 2)
        runs[k] = _stored_ratios(tmp_path / str(k))
    for name, host in runs[1].items():
        assert len(host) == N // BATCH
        np.testing.assert_allclose(runs[2][name], host, rtol=2e-5)  # float32 in the step


def test_no_alias_of_a_variable_is_left_behind() -> None:
    variable = tf.Variable(tf.random.normal((64, 32)))
    ratios = HostRatios.create([variable], 1)
    assert ratios is not None
    variable.assign_add(tf.ones_like(variable))
    ratios.measure()
    address = _alias(variable).ctypes.data  # the alias dropped at once
    variable.assign_add(tf.ones_like(variable))  # with a live alias TF would write a copy
    assert _alias(variable).ctypes.data == address


def test_the_cases_that_keep_the_in_step_measure() -> None:
    assert HostRatios.create([tf.Variable(tf.zeros(4, tf.bfloat16))], 1) is None  # no kernel for it
    assert HostRatios.create([tf.Variable(tf.zeros(4))], 2) is None  # several steps per batch
    assert HostRatios.create([], 1) is None
