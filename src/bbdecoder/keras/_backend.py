"""Import TensorFlow and Keras 3 with the TensorFlow backend, quietly, or fail with the fix.

Every module of :mod:`bbdecoder.keras` imports ``tf`` and ``keras`` from here, so the environment is
set before Keras picks its backend (``KERAS_BACKEND`` is read once, at Keras' first import).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import tensorflow as tf
except ImportError as error:  # pragma: no cover - exercised only where TensorFlow is missing
    raise ImportError(
        "bbdecoder.keras needs TensorFlow (Keras 3 with the TensorFlow backend); install it with "
        "`pip install bbdecoder[tensorflow]` (tensorflow-cpu>=2.16)"
    ) from error

import keras

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the user's environment
    raise ImportError(
        f"bbdecoder.keras explains models through tf.GradientTape, but Keras runs on the "
        f"{keras.backend.backend()!r} backend; set KERAS_BACKEND=tensorflow before Keras is first imported"
    )

__all__ = ["keras", "tf"]
