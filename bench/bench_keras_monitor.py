"""Per-step cost of the Keras ``MonitorCallback`` on an MNIST-sized Keras CNN (TensorFlow, CPU).

The model: Conv2D(32, 3) ReLU, Conv2D(64, 3) ReLU, MaxPool 2, Dropout 0.25, Dense(128) ReLU,
Dense(10) (1.2M parameters, as ``mnist`` in ``bench_monitor.py``), batch 32, Adam. Configurations:
``plain`` (``model.fit``), ``callback`` (+ ``MonitorCallback``: six gradient statistics and the
update ratio of every variable, the store write, every step) and ``callback+act`` (+ the
activation probes, ``activations=True``: the three ReLUs); with ``--ablation`` also both with the
host passes in the step, one after the other (``-inline``: the ratio pass after the statistics where
no core is spare, not beside them on the callback's host worker; the probes' kernel in the step where
a core is spare, not on the host worker); with ``--tfops`` also both with the statistics and ratios in TF
ops instead of the host kernels (``-tfops``); with ``--every K`` also
both with ``every=K`` (``-everyK``: the statistics and ratios of one step in K), with ``--flush K``
also both with ``flush_every=K`` (``-flushK``: one store transaction and one writer-thread job per K
steps). With either, every configuration's step time is the mean over the measured batches, not
the median, which would leave out the recorded (or flushed) steps.

Each round runs one ``fit`` epoch of ``--batches`` batches per configuration (the order rotated
between rounds); a timing callback first in the list stamps each batch's begin, one last in the list
its end, so a batch's time is the train step plus every callback's work on it. The first two batches
of each ``fit`` are left out (the callback retraces the train function when ``fit`` starts, a
once-per-fit cost). A round's ratio is the median batch time of a configuration over the median of
``plain`` in the same round; the result is the median of the rounds' ratios, with quartiles.

Whole fits several seconds apart differ by 10-20% on a shared VM, more than the cost measured;
``--block-rounds`` adds the same comparison without ``fit`` (:func:`measure_blocks`: blocks of
``--block`` consecutive steps, each step the train function and the callback's batch end, the
configurations taking turns every few hundred milliseconds). Run::

    PYTHONPATH=src python bench/bench_keras_monitor.py --threads 1 --rounds 9 --block-rounds 41
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _set_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _model() -> Any:
    from bbdecoder.keras import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, name="conv1"),
            keras.layers.ReLU(name="relu1"),
            keras.layers.Conv2D(64, 3, name="conv2"),
            keras.layers.ReLU(name="relu2"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Dropout(0.25, name="drop"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, name="fc1"),
            keras.layers.ReLU(name="relu3"),
            keras.layers.Dense(10, name="fc2"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


class _Stamp:
    """Two callbacks around the others: ``begin`` first in the list, ``end`` last."""

    def __init__(self) -> None:
        from bbdecoder.keras import keras

        stamp = self
        self.times: list[float] = []
        self._t0 = 0.0

        class Begin(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                stamp._t0 = time.perf_counter()

        class End(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                stamp.times.append(time.perf_counter() - stamp._t0)

        self.begin, self.end = Begin(), End()


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """Within this block new callbacks of an ablation measure another way: ``-tfops`` in TF ops, not
    the host kernels; ``-inline`` with the host passes in the step, one after the other."""
    from bbdecoder.keras import monitor as keras_monitor
    from bbdecoder.keras import monitor_capture

    saved = keras_monitor.host_kernels, keras_monitor.spare_core, monitor_capture.pair_passes
    if name.endswith("-tfops"):
        keras_monitor.host_kernels = lambda: False
    if name.endswith("-inline"):
        keras_monitor.spare_core = monitor_capture.pair_passes = lambda: False
    try:
        yield
    finally:
        keras_monitor.host_kernels, keras_monitor.spare_core, monitor_capture.pair_passes = saved


def _callback(path: Path, name: str) -> Any:
    """The ``MonitorCallback`` of configuration ``name``
    (``callback[+act][-inline|-tfops|-everyK|-flushK]``)."""
    from bbdecoder.keras.monitor import MonitorCallback

    every = int(name.rsplit("-every", 1)[1]) if "-every" in name else 1
    flush_every = int(name.rsplit("-flush", 1)[1]) if "-flush" in name else 1
    return MonitorCallback(
        path, activations=name.startswith("callback+act"), every=every, flush_every=flush_every
    )


def _step_time(times: list[float], every: int) -> float:
    """A configuration's time per step in one round: the median, or with ``--every`` the mean."""
    return statistics.fmean(times) if every > 1 else statistics.median(times)


def measure(rounds: int, batches: int, names: list[str], every: int = 1) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * batches, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(32 * batches,))
    models = {n: _model() for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):  # round 0: warm-up (the first trace of each train function)
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                stamp = _Stamp()
                callbacks = [stamp.begin]
                if name != "plain":
                    path = Path(tmp) / f"{name}_{r}"
                    callbacks.append(_callback(path, name))
                callbacks.append(stamp.end)
                with _variant(name):
                    models[name].fit(
                        x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=callbacks
                    )
                if r > 0:
                    per_round[name].append(_step_time(stamp.times[2:], every))
    return _summary(per_round, names, load_before, "fit")


def measure_blocks(rounds: int, block: int, names: list[str], every: int = 1) -> dict[str, Any]:
    """The same configurations, driven step by step without ``fit``: per round, ``block``
    consecutive steps of each configuration in turn (the order rotated), each step its train
    function and the callback's ``on_train_batch_end``, the first step of a block left out (the
    switch from another model's data). A round's ratio compares the medians of two blocks a few
    hundred milliseconds apart, where ``fit`` rounds compare whole fits several seconds apart."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * 64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(32 * 64,))
    setups: dict[str, tuple[Any, Any, Any]] = {}
    tmp = tempfile.TemporaryDirectory()
    for name in names:
        model = _model()
        model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)  # builds the optimizer
        callback = None
        if name == "plain":
            model.make_train_function(force=True)
        else:
            callback = _callback(Path(tmp.name) / name, name)
            with _variant(name):
                callback.set_model(model)
                callback.on_train_begin()
        data = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat())
        setups[name] = (model, callback, data)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    try:
        for r in range(rounds + 1):  # round 0: warm-up (the first trace of each train function)
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                model, callback, data = setups[name]
                times = []
                for step in range(block + 1):
                    t0 = time.perf_counter()
                    model.train_function(data)
                    if callback is not None:
                        callback.on_train_batch_end(step)
                    times.append(time.perf_counter() - t0)
                if r > 0:
                    per_round[name].append(_step_time(times[1:], every))
    finally:
        for _, callback, _ in setups.values():
            if callback is not None:
                callback.close()
        tmp.cleanup()
    return _summary(per_round, names, load_before, f"blocks of {block} steps")


def _names(ablation: bool, every: int = 1, tfops: bool = False, flush: int = 1) -> list[str]:
    names = ["plain", "callback", "callback+act"]
    if ablation:
        names += ["callback-inline", "callback+act-inline"]
    if tfops:
        names += ["callback-tfops", "callback+act-tfops"]
    if every > 1:
        names += [f"callback-every{every}", f"callback+act-every{every}"]
    if flush > 1:
        names += [f"callback-flush{flush}", f"callback+act-flush{flush}"]
    return names


def _summary(
    per_round: dict[str, list[float]], names: list[str], load_before: tuple[float, ...], how: str
) -> dict[str, Any]:
    plain = per_round["plain"]
    out: dict[str, Any] = {
        "plain_median_s": statistics.median(plain),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "configs": {},
    }
    plain_ms = out["plain_median_s"] * 1e3
    print(f"\n== Keras MNIST CNN, batch 32, {how}: plain step {plain_ms:.1f} ms, load {load_before[0]:.1f}")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(per_round[name], plain, strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out["configs"][name] = {
            "median_step_s": statistics.median(per_round[name]),
            "step_ratio": statistics.median(ratios),
            "step_ratio_q1": q[0],
            "step_ratio_q3": q[2],
        }
        print(f"  {name:<19} step x{statistics.median(ratios):.3f} [{q[0]:.3f}, {q[2]:.3f}]", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--ablation", action="store_true", help="also the callback with its host passes in the step (-inline)"
    )
    parser.add_argument(
        "--tfops", action="store_true", help="also the callback with its passes in TF ops (-tfops)"
    )
    parser.add_argument("--block-rounds", type=int, default=0, help="rounds of --block steps (0: none)")
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--every", type=int, default=1, help="also the callback with every=K (-everyK)")
    parser.add_argument("--flush", type=int, default=1, help="also the callback with flush_every=K (-flushK)")
    args = parser.parse_args()
    _set_threads(args.threads)
    names = _names(args.ablation, args.every, args.tfops, args.flush)
    spread = max(args.every, args.flush)  # above 1: a step's time is the mean over the batches
    from common import environment, save_results

    result = {
        "environment": environment(),
        "rounds": args.rounds,
        "batches": args.batches,
        "every": args.every,
        "flush": args.flush,
        "per_round_step": "mean" if spread > 1 else "median",
    }
    if args.rounds:
        result["keras_mnist"] = measure(args.rounds, args.batches, names, spread)
    if args.block_rounds:
        result["block_rounds"], result["block"] = args.block_rounds, args.block
        blocks = measure_blocks(args.block_rounds, args.block, names, spread)
        result["keras_mnist_blocks"] = blocks
    path = save_results(f"keras_monitor_t{args.threads}{args.tag}", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
