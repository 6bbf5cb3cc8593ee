"""One device-to-host copy per step, without stalling a GPU pipeline.

On CPU the statistics vector is read at once. On CUDA it is copied with ``non_blocking=True`` into
one of two pinned host buffers and an event is recorded; the analyzer reads it one step later (or
at the epoch end / close), after ``event.synchronize()``, by which time the copy has long finished:
no ``cudaDeviceSynchronize`` inside the training step. ``HostCopy(deferred=True)`` runs the same
bookkeeping on CPU, so the logic is tested without a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class HostCopy:
    """Queue of at most one statistics vector in flight: :meth:`submit` returns what is now ready."""

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._turn = 0
        self._pending: tuple[torch.Tensor, Any, Any] | None = None  # (host buffer, event, meta)

    def submit(self, values: torch.Tensor, meta: Any) -> list[tuple[np.ndarray, Any]]:
        """Hand over one step's 1-D vector; returns the ``(host array, meta)`` pairs ready now
        (this step's on an immediate copy, the previous step's when deferred)."""
        if not self.deferred:
            return [(values.cpu().numpy(), meta)]
        ready = self.drain()
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.numel() != values.numel():
            pin = values.device.type == "cuda"
            buffer = torch.empty(values.numel(), dtype=values.dtype, pin_memory=pin)
            self._buffers[self._turn] = buffer
        buffer.copy_(values, non_blocking=values.device.type == "cuda")
        event = None
        if values.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._pending = (buffer, event, meta)
        self._turn = 1 - self._turn
        return ready

    def drain(self) -> list[tuple[np.ndarray, Any]]:
        """The vector still in flight, if any (waits for its copy)."""
        if self._pending is None:
            return []
        buffer, event, meta = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return [(buffer.numpy().copy(), meta)]

    @property
    def in_flight(self) -> bool:
        return self._pending is not None
