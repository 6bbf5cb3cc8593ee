"""The moments of each large gradient read on the writer thread as soon as backward has written it.

The backward pass writes a model's gradients one by one, from the output layer back, and the
layers nearer the input still take most of its time: the first gradients are final long before
``Analyzer.step()`` reads them. On the CPU path, the post-accumulate-grad hook that counts backward
passes also hands each gradient larger than :data:`~bbdecoder.monitor.grad_stats.TINY` elements to
one job on the writer thread, which reads its four moments
(:func:`~bbdecoder.monitor.cpu_reductions.moments`) while backward goes on, on a core that torch's
own threads leave free. ``step()`` waits for the read in progress, takes what is done, reads the
gradients the job has not begun itself, and finishes the statistics as before.

A result is used only where it is the one ``step()`` would compute, to the bit: the gradient is the
same tensor (``p.grad`` not replaced) and its version counter did not move from before the read to
``step()`` (gradient accumulation, ``clip_grad_norm_``, an all-reduce or any in-place change after
the read drops it; the version is bumped after an in-place op has written, so a write that overlaps
the read is seen too). Other gradients are read in ``step()``. Same conditions as
:mod:`~bbdecoder.monitor.ratio_prefetch`: a spare core, the CPU path, this process's own store.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from bbdecoder.monitor import ratio_prefetch
from bbdecoder.monitor.cpu_reductions import Moments, Scratch, flat_array, moments
from bbdecoder.monitor.grad_stats import TINY

__all__ = ["GradPrefetch"]


class _Read:
    """One gradient's moments, with the tensor (weakly) and its version, unchanged over the read."""

    __slots__ = ("grad", "moments", "version")

    def __init__(self, grad: torch.Tensor, version: int, moments: Moments) -> None:
        self.grad = weakref.ref(grad)
        self.version = version
        self.moments = moments

    def holds_for(self, grad: torch.Tensor) -> bool:
        return self.grad() is grad and grad._version == self.version


def _read(grad: torch.Tensor, scratch: Scratch) -> _Read | None:
    array = flat_array(grad)
    if array is None:
        return None
    before = grad._version
    (found,) = moments([array], scratch)
    return _Read(grad, before, found) if grad._version == before else None


class GradPrefetch:
    """Reads gradients on the writer thread as backward writes them (see the module docstring)."""

    def __init__(self) -> None:
        self._scratch = Scratch()  # the writer thread's own: step() reads with the analyzer's
        self._lock = threading.Condition()
        self._waiting: dict[int, torch.Tensor] = {}  # row -> gradient not read yet
        self._done: dict[int, _Read] = {}
        self._active = False  # a job is queued or running on the writer thread
        # this step's spare_core(), asked at its first gradient: where torch uses every core, each
        # later hook returns at once (asking per gradient cost BERT-mini 0.7 ms per backward)
        self._spare: bool | None = None
        self.used = 0  # results taken (for the tests and the benchmark)

    def written(self, analyzer: Any, row: int, tensor: torch.Tensor) -> None:
        """Backward has accumulated ``tensor.grad`` (the post-accumulate-grad hook)."""
        if self._spare is False:
            return  # no core to spare this step: step() reads the gradients
        grad = tensor.grad
        if grad is None or grad.layout != torch.strided or grad.numel() <= TINY:
            return  # a sparse gradient is densified and read in step()
        if not analyzer.records_current_step or analyzer.closed:
            return  # step() records nothing this time
        with self._lock:
            start = not self._active
            if start:
                if self._spare is None:
                    self._spare = ratio_prefetch.spare_core()
                if not self._spare:
                    return
            self._waiting[row] = grad
            self._active = True
        if start:
            analyzer.writer.run_soon(self._work)

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._waiting:
                        return
                    row, grad = self._waiting.popitem()
                found = _read(grad, self._scratch)
                with self._lock:
                    if found is not None:
                        self._done[row] = found
        finally:
            with self._lock:
                self._active = False
                self._lock.notify_all()

    def take(self, rows: list[int], grads: list[torch.Tensor]) -> list[Moments | None]:
        """The moments read for ``grads`` (of tracked ``rows``) that still hold, ``None`` for the
        others; waits for the read in progress, drops what is not taken."""
        self._spare = None  # asked again at the next backward's first gradient
        with self._lock:
            self._waiting.clear()  # not begun: step() reads them itself
            self._wait_locked()
            done, self._done = self._done, {}
        out: list[Moments | None] = []
        for row, grad in zip(rows, grads, strict=True):
            found = done.get(row)
            if found is not None and found.holds_for(grad):
                self.used += 1
                out.append(found.moments)
            else:
                out.append(None)
        return out

    def wait(self) -> None:
        """Block until every gradient handed over so far has been read."""
        with self._lock:
            self._wait_locked()

    def _wait_locked(self) -> None:
        while self._active:
            self._lock.wait()

    def settle(self) -> None:
        """Wait for a job in flight and drop its results (at close)."""
        self.take([], [])
