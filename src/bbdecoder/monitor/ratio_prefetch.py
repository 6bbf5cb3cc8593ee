"""Update ratios measured right after ``optimizer.step()``, on the store's writer thread.

The ratio of a recorded step compares the weights after its ``optimizer.step()`` with the snapshot
taken at the step, and the weights do not change again until the next ``optimizer.step()``: the
forward and backward passes in between only read them. So on the CPU path the ratio pass (a read
of every weight and its snapshot, a write of the new snapshot: about half the cost of
``Analyzer.step()``) runs on the writer thread while the next forward and backward pass run, on a
core that torch's own threads leave free, and the next ``step()`` takes the result.

A global optimizer step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``,
removed with the analyzer's other hooks) starts the pass. It starts only where the result is the
one the inline pass would give, to the bit:

- one ``optimizer.step()`` moved every tracked tensor (an optimizer over a part of them, one of two
  GAN optimizers, starts nothing; a second step of an optimizer holding any of them before
  ``Analyzer.step()`` drops the pass; other models' optimizers are ignored);
- a spare core: fewer torch threads than CPUs this process may use (else the pass would slow
  torch's own threads down: every parallel region waits for its slowest thread). On a machine
  with SMT torch's default is one thread per physical core, so the pass shares a core with a
  sibling hyperthread;
- the analyzer writes its own store on the CPU (no rank sync, no CUDA).

The pass writes the new snapshot into a second buffer (a second copy of the weights, allocated
once), the first is left as it was. The next ``step()`` checks that no tracked tensor was changed
in place since the hook (its version counter: ``p.clamp_()``, ``p.copy_()`` under ``no_grad``)
and that none was replaced (``p.data = ...``); otherwise it drops the result and measures inline
against the untouched snapshot. A change through ``p.data`` in place bumps no version counter:
made while the pass runs, it is measured at whatever point the pass read it.
"""

from __future__ import annotations

import os
import threading
import weakref
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bbdecoder.monitor.weights import Measured, UpdateRatios

__all__ = ["RatioPrefetch", "spare_core"]


def spare_core() -> bool:
    """True where torch's intra-op threads leave a CPU of this process free for the writer thread."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return torch.get_num_threads() < cpus


class _Pending:
    """One pass handed to the writer thread: the versions of the tensors when it started, its result."""

    def __init__(self, versions: list[int]) -> None:
        self.versions = versions
        self.result: Measured | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.stale = False  # another optimizer step moved weights after the pass started

    def wait(self, writer: Any) -> Measured | None:
        """The pass's result once it has run (its error raised here); ``None`` if the writer thread
        ended without running it. Waits for this pass alone: the jobs ``run_then_flush`` holds
        stay held."""
        while not self.done.wait(0.5):
            thread = getattr(writer, "_thread", None)
            if thread is None or not thread.is_alive():
                return None
        if self.error is not None:
            raise self.error
        return self.result


def _measure(ratios: UpdateRatios, tensors: list[torch.Tensor], pending: _Pending) -> None:
    try:
        pending.result = ratios.measure_aside(tensors)
    except BaseException as err:  # raised by the next step(), which waits for this pass
        pending.error = err
    finally:
        pending.done.set()


def _after_optimizer_step(ref: weakref.ReferenceType[RatioPrefetch], optimizer: Any, *_: Any) -> None:
    prefetch = ref()
    if prefetch is not None:
        prefetch.after_step(optimizer)


class RatioPrefetch:
    """Starts the ratio pass after each ``optimizer.step()`` and hands its result to the next
    ``Analyzer.step()`` (see the module docstring). Holds the analyzer weakly."""

    def __init__(self, analyzer: Any) -> None:
        self._analyzer = weakref.ref(analyzer)
        self._ids = {id(p.tensor) for p in analyzer._params}
        self._covers: weakref.WeakKeyDictionary[Any, tuple[int, bool, bool]] = weakref.WeakKeyDictionary()
        self._pending: _Pending | None = None
        self.used = 0  # results taken (for the tests and the benchmark)
        self.needs_spare_core = True  # False: start the pass even when torch uses every core
        hook = partial(_after_optimizer_step, weakref.ref(self))
        analyzer._hooks.add(register_optimizer_step_post_hook(hook))

    def after_step(self, optimizer: Any) -> None:
        covers_all, touches = self._holds(optimizer)
        if not touches:
            return  # another model's optimizer
        if self._pending is not None:
            self._pending.stale = True  # tracked weights moved again while (or after) the pass read them
            return
        analyzer = self._analyzer()
        if analyzer is None or analyzer.closed or not covers_all or not self._startable(analyzer):
            return
        tensors = [p.tensor for p in analyzer._params]
        pending = _Pending([t._version for t in tensors])
        analyzer.writer.run_soon(partial(_measure, analyzer._ratios, tensors, pending))
        self._pending = pending

    def _startable(self, analyzer: Any) -> bool:
        if analyzer._ratio_label is None or not analyzer._ratios.ready:
            return False  # no recorded step waits for its update
        return not self.needs_spare_core or spare_core()

    def _holds(self, optimizer: Any) -> tuple[bool, bool]:
        """Whether ``optimizer`` holds every tracked tensor, and any (cached while its groups keep
        their size)."""
        groups = getattr(optimizer, "param_groups", [])
        size = sum(len(g["params"]) for g in groups)
        known = self._covers.get(optimizer)
        if known is None or known[0] != size:
            held = {id(p) for g in groups for p in g["params"]}
            known = (size, self._ids <= held, not self._ids.isdisjoint(held))
            self._covers[optimizer] = known
        return known[1], known[2]

    def take(self, analyzer: Any, tensors: list[torch.Tensor], keep: bool) -> np.ndarray | None:
        """The ratios ``(n,)`` of the pass started since the last step, adopted by the analyzer's
        tracker (``keep``: as for ``UpdateRatios.measure_host``), or ``None`` (no pass, or its
        result does not hold: measure inline)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        result = pending.wait(analyzer.writer)  # the pass is over (its error, if any, is raised here)
        if result is None or pending.stale or [t._version for t in tensors] != pending.versions:
            return None
        if not result.plan.fits(tensors):
            return None
        self.used += 1
        return analyzer._ratios.adopt(result, keep)

    def settle(self, analyzer: Any) -> None:
        """Wait for a pass in flight and drop it (before the tracker is used here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait(analyzer.writer)

    def drop(self) -> None:
        """Forget a pass without waiting (at close, once the writer thread has been waited for)."""
        self._pending = None
