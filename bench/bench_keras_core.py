"""The cost of writing the Keras methods once: the shared code (torch in the middle) against the same
computation written directly in TensorFlow.

The shared Integrated Gradients and SmoothGrad run on ``KerasBackend``: each pass converts its rows
from torch to a ``tf.Tensor`` and the gradient back. The reference is a plain TensorFlow loop doing
the same passes (the same rows per pass, the same quadrature nodes and weights, the noise drawn the
same way), i.e. what a Keras-only implementation does. The ratio is the boundary's overhead; the
numbers of both are checked equal first.

Setting: a VGG-style Keras CNN (3 stages of two 3x3 convs, widths 16/32/64, max-pool, GAP, Dense)
at 64 px, batch 2, float32, IG with 50 trapezoid steps in passes of 20 rows, SmoothGrad with 16
copies in passes of 16 rows; TensorFlow pinned to ``--threads`` intra-op threads, interleaved rounds.

Usage: ``python bench/bench_keras_core.py [--threads 1] [--repeats 5]`` (project venv, TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, interleaved, paired_ratio, pin_threads, save_results

ROWS = 20
STEPS = 50
COPIES = 16


def build(tf: Any, keras: Any) -> Any:
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((64, 64, 3))
    h = inputs
    for width in (16, 32, 64):
        h = layers.Conv2D(width, 3, padding="same", activation="relu")(h)
        h = layers.Conv2D(width, 3, padding="same", activation="relu")(h)
        h = layers.MaxPooling2D(2)(h)
    return keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(h)))


def tf_integrated_gradients(tf: Any, model: Any, x: Any, classes: Any) -> np.ndarray:
    """IG from a black baseline, step-major rows in passes of ROWS, all in TensorFlow."""
    from bbdecoder.attribution.quadrature import quadrature

    alphas, weights = quadrature("riemann_trapezoid", STEPS)
    n = int(x.shape[0])
    total = np.zeros(x.shape, dtype=np.float32)
    for start in range(0, n * STEPS, ROWS):
        rows = np.arange(start, min(start + ROWS, n * STEPS))
        sample, step = rows % n, rows // n
        path = tf.gather(x, sample) * tf.constant(alphas.numpy()[step].astype("float32"))[:, None, None, None]
        with tf.GradientTape() as tape:
            tape.watch(path)
            score = tf.reduce_sum(
                tf.gather(model(path, training=False), tf.gather(classes, sample), batch_dims=1)
            )
        grad = tape.gradient(score, path).numpy()
        for offset, (s, i) in enumerate(zip(step, sample, strict=True)):
            total[i] += float(weights[s]) * grad[offset]
    return x.numpy() * total


def tf_smoothgrad(tf: Any, model: Any, x: Any, classes: Any, seed: int) -> np.ndarray:
    """SmoothGrad's mean gradient over COPIES noisy copies in one pass, the noise drawn as the shared
    code draws it (a seeded torch generator, channel-first order)."""
    array = x.numpy()
    generator = torch.Generator().manual_seed(seed)
    flat = array.reshape(array.shape[0], -1)
    sigma = (0.15 * (flat.max(1) - flat.min(1))).reshape(-1, 1, 1, 1)
    noisy = []
    for _ in range(COPIES):
        # one draw of one sample's shape per copy, shared by the samples
        noise = torch.randn((1, array.shape[3], *array.shape[1:3]), generator=generator).numpy()
        noisy.append(array + sigma * np.moveaxis(noise, 1, -1))
    batch = tf.constant(np.concatenate(noisy))
    with tf.GradientTape() as tape:
        tape.watch(batch)
        score = tf.reduce_sum(
            tf.gather(model(batch, training=False), tf.tile(classes, [COPIES]), batch_dims=1)
        )
    grads = tape.gradient(score, batch).numpy()
    return grads.reshape(COPIES, *array.shape).mean(axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import bbdecoder.keras as bk
    from bbdecoder.keras import keras

    model = build(tf, keras)
    x = tf.constant(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32"))
    classes = tf.argmax(model(x, training=False), axis=1)
    ig = bk.IntegratedGradients(model)
    smooth = bk.SmoothGrad(model, n_samples=COPIES, seed=0, internal_batch_size=2 * COPIES)

    def ours_ig() -> Any:
        return ig.attribute(x, classes, n_steps=STEPS, internal_batch_size=ROWS).numpy()

    def ours_smooth() -> Any:
        return smooth.attribute(x, classes).numpy()

    agreement = {
        "ig_max_abs_diff": float(np.abs(ours_ig() - tf_integrated_gradients(tf, model, x, classes)).max()),
        "smoothgrad_max_abs_diff": float(
            np.abs(ours_smooth() - tf_smoothgrad(tf, model, x, classes, 0)).max()
        ),
    }
    print("agreement:", agreement, flush=True)
    timings = interleaved(
        {
            "shared_ig": ours_ig,
            "tf_ig": lambda: tf_integrated_gradients(tf, model, x, classes),
            "shared_smoothgrad": ours_smooth,
            "tf_smoothgrad": lambda: tf_smoothgrad(tf, model, x, classes, 0),
        },
        args.repeats,
    )
    ratios = {
        "ig": paired_ratio(timings["shared_ig"], timings["tf_ig"]),
        "smoothgrad": paired_ratio(timings["shared_smoothgrad"], timings["tf_smoothgrad"]),
    }
    for name, ratio in ratios.items():
        print(f"{name}: shared / plain TF = {ratio['median_of_ratios']:.2f} (median of per-round ratios)")
    save_results(
        f"keras_core_t{threads}",
        {
            "environment": {**environment(), "threads": threads, "load_average": os.getloadavg()},
            "agreement": agreement,
            "timings": {name: timing.summary() for name, timing in timings.items()},
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
