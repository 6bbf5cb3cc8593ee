"""The update ratios of a Keras model's CPU variables, measured on the host between two batches.

Inside the compiled train step an update ratio costs about six passes over the weights (XLA is off
on CPU, so each TF op is its own pass): holding the weights from before the update makes TF copy
every updated variable, then the squared difference is written and summed, and the norm read. On
the host it is two reads and one write: ``||W - S||`` and ``||W||`` against a snapshot ``S`` of
the weights at the last batch's end, which the same pass overwrites with ``W``
(:func:`bbdecoder.monitor.cpu_reductions.update_norms`, the PyTorch monitor's kernel).

The weights are read through zero-copy NumPy aliases (DLPack; ``Variable.numpy()`` copies), taken
after the batch and dropped before the next one: TF copies a buffer with a live alias when it
updates it. Used where Keras runs one step per batch (``steps_per_execution=1``) on CPU variables
of float32/float64 outside a distribution strategy; elsewhere the ratios stay in the train step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bbdecoder.keras._backend import keras, tf
from bbdecoder.monitor.cpu_reductions import Scratch, moments, update_norms

__all__ = ["HostRatios"]


def _alias(variable: Any) -> np.ndarray:
    """A flat NumPy view of a CPU ``tf.Variable``'s buffer (the raw read op: ``value()`` adds ~20 us
    of Python per variable)."""
    read = tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype)
    capsule = tf.experimental.dlpack.to_dlpack(read)
    return torch.utils.dlpack.from_dlpack(capsule).numpy().reshape(-1)


def _usable(variable: Any) -> bool:
    return (
        isinstance(variable, tf.Variable)
        and getattr(variable, "_distribute_strategy", None) is None
        and variable.dtype in (tf.float32, tf.float64)
        and "CPU" in (variable.device or "CPU").upper()
    )


class HostRatios:
    """Update ratios ``||W_after - W_before|| / ||W_before||`` (``||W_after - W_before||`` where
    ``||W_before|| = 0``) of ``variables`` between two calls of :meth:`measure`."""

    def __init__(self, variables: list[Any]) -> None:
        self._variables = variables
        views = [_alias(v) for v in variables]
        self._snapshots = [view.copy() for view in views]
        del views
        self._norms = [math.sqrt(m[3]) for m in moments(self._snapshots, Scratch())]

    @classmethod
    def create(cls, variables: list[Any], steps_per_execution: int) -> HostRatios | None:
        """A host measure of ``variables`` (Keras variables or ``tf.Variable``), or ``None`` where
        the ratios must stay in the train step (see the module docstring)."""
        raw = [v.value if isinstance(v, keras.Variable) else v for v in variables]  # wraps a tf.Variable
        if steps_per_execution != 1 or not raw or not all(_usable(v) for v in raw):
            return None
        try:
            return cls(raw)
        except (RuntimeError, TypeError, ValueError, BufferError):  # no DLPack export here
            return None

    def measure(self) -> np.ndarray:
        """The ``(n,)`` float64 ratios since the last call (or since construction); the snapshot
        becomes the current weights."""
        views = [_alias(v) for v in self._variables]
        squares = update_norms(views, self._snapshots, True)
        del views  # before the next step updates the variables
        ratios = np.empty(len(squares))
        for i, ((delta, norm), before) in enumerate(zip(squares, self._norms, strict=True)):
            size = math.sqrt(delta)
            ratios[i] = size / before if before > 0 else size
            self._norms[i] = math.sqrt(norm)
        return ratios
