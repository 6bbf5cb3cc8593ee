"""Per-step cost of the Keras ``MonitorCallback`` on an MNIST-sized Keras CNN (TensorFlow, CPU).

The model: Conv2D(32, 3) ReLU, Conv2D(64, 3) ReLU, MaxPool 2, Dropout 0.25, Dense(128) ReLU,
Dense(10) (1.2M parameters, as ``mnist`` in ``bench_monitor.py``), batch 32, Adam. Configurations:
``plain`` (``model.fit``), ``callback`` (+ ``MonitorCallback``: six gradient statistics and the
update ratio of every variable, the store write, every step) and ``callback+act`` (+ the
activation probes, ``activations=True``).

Each round runs one ``fit`` epoch of ``--batches`` batches per configuration (the order rotated
between rounds); a timing callback first in the list stamps each batch's begin, one last in the list
its end, so a batch's time is the train step plus every callback's work on it. The first two batches
of each ``fit`` are left out (the callback retraces the train function when ``fit`` starts, a
once-per-fit cost). A round's ratio is the median batch time of a configuration over the median of
``plain`` in the same round; the result is the median of the rounds' ratios, with quartiles. Run::

    PYTHONPATH=src python bench/bench_keras_monitor.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
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


def measure(rounds: int, batches: int) -> dict[str, Any]:
    import numpy as np

    from bbdecoder.keras.monitor import MonitorCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * batches, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(32 * batches,))
    names = ["plain", "callback", "callback+act"]
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
                    callbacks.append(MonitorCallback(path, activations=name == "callback+act"))
                callbacks.append(stamp.end)
                models[name].fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
                if r > 0:
                    per_round[name].append(statistics.median(stamp.times[2:]))
    plain = per_round["plain"]
    out: dict[str, Any] = {
        "plain_median_s": statistics.median(plain),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "configs": {},
    }
    plain_ms = out["plain_median_s"] * 1e3
    print(f"\n== Keras MNIST CNN, batch 32: plain step {plain_ms:.1f} ms, load {load_before[0]:.1f}")
    for name in names[1:]:
        ratios = [a / b for a, b in zip(per_round[name], plain, strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out["configs"][name] = {
            "median_step_s": statistics.median(per_round[name]),
            "step_ratio": statistics.median(ratios),
            "step_ratio_q1": q[0],
            "step_ratio_q3": q[2],
        }
        print(f"  {name:<13} step x{statistics.median(ratios):.3f} [{q[0]:.3f}, {q[2]:.3f}]", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    _set_threads(args.threads)
    from common import environment, save_results

    result = {"environment": environment(), "rounds": args.rounds, "batches": args.batches}
    result["keras_mnist"] = measure(args.rounds, args.batches)
    path = save_results(f"keras_monitor_t{args.threads}{args.tag}", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
