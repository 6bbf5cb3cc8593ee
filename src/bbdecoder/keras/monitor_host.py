"""The Keras capture's passes on the host: the gradient statistics and the update ratios of every
tracked variable, each pass called once per step, and each watched layer's activation probe, by
the PyTorch monitor's fused CPU kernels, called from the traced train step through
``tf.numpy_function``.

Without XLA each TF op is its own pass over memory with its own dispatch: the statistics took five
passes and about ten ops per variable, the update ratio a copy of every weight (a read held
across the optimizer's in-place update makes TF copy the buffer), three passes and as many ops.
Here each pass is one C loop over all the variables, float64 sums, the GIL released: the
statistics with the monitor's one-pass variance and its redo rule, the ratios against a host
snapshot of the weights (the :class:`~bbdecoder.monitor.weights.UpdateRatios` scheme: each weight
and its snapshot read once, the snapshot rewritten, ``||W_after||`` kept as the next step's
``||W_before||``). TF hands the arrays over without a copy (CPU tensors share their buffers).

A probe's state (per-channel maximum, saturated and total counts, summed channel variance,
forwards) then lives in NumPy arrays that ``probe_update`` updates in place in one read of the
output, where the TF ops read it four times and wrote two masks.

Used where the kernels are built, the train step is not compiled by XLA (which has no
``numpy_function``) and no distribution strategy splits the step over replicas (sparse gradients
are made dense and other dtypes than float32/float64 cast to float32 first, as the TF ops do; a
probe also needs a saturation test the kernel's comparisons express and static sizes after the
channel axis); elsewhere the TF ops of :mod:`~bbdecoder.keras.monitor_capture` and
:mod:`~bbdecoder.keras.monitor_activations` run.

Where the passes run: the statistics in the step. The ratio pass on the store's writer thread,
after the step, where TF's pools leave a core free (beside the next forward and backward pass);
else, on a machine of two or more CPUs, on the callback's host worker thread
(:mod:`~bbdecoder.keras.host_worker`) *during* the statistics (at the end of the step TF's own
threads wait for the ``numpy_function``, so the core the ratio pass takes is idle), else in the
step after them. With a spare core the activation probes hand each output to the host worker too
(the output's buffer, referenced by the array, is not reused by TF while the probe reads it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import numpy as np
import torch

from bbdecoder.keras._backend import tf
from bbdecoder.monitor import cpu_reductions
from bbdecoder.monitor.grad_stats import small_statistics
from bbdecoder.monitor.moment_rows import array_statistics
from bbdecoder.monitor.probe_kernel import RULE_OPS
from bbdecoder.store.vocabulary import GRAD_STATS

__all__ = [
    "COLUMNS",
    "FINITE",
    "NSTATS",
    "RATIO",
    "HostProbe",
    "HostRatios",
    "HostStep",
    "Runner",
    "Submit",
    "host_call",
    "host_kernels",
    "host_statistics",
    "one_replica",
    "spare_core",
    "usable_cpus",
]

NSTATS = len(GRAD_STATS)
RATIO, FINITE = NSTATS, NSTATS + 1  # a step table's columns after the six statistics
COLUMNS = NSTATS + 2

Runner = Callable[[Callable[[], Any]], Any]
"""Runs a job on another thread and returns at once (``HostWorker.run_soon``)."""
Submit = Callable[[Callable[[], Any]], Future[Any]]
"""Runs a job on another thread and returns its future (``HostWorker.submit``)."""


def host_kernels() -> bool:
    """The fused kernels are built (``BBDECODER_FUSED`` not ``0``): the host passes can run."""
    return cpu_reductions.fused_kernels()


def host_call(fn: Callable[..., np.ndarray], inputs: list[Any], name: str, active: Any = None) -> None:
    """``fn(*arrays)`` on the host, in the step's order: a stateful ``numpy_function`` in a traced
    step (TF runs it, its output unused), a direct call on the tensors' NumPy views when eager.
    ``active``: a boolean tensor, the call is made only where it is true (in a traced step a
    ``tf.cond``, so the other steps do not enter Python at all); ``None``: always."""
    if tf.executing_eagerly():
        if active is None or bool(active):
            fn(*[np.asarray(t) for t in inputs])
        return

    def call() -> Any:
        return tf.numpy_function(fn, inputs, tf.float64, stateful=True, name=name)

    if active is None:
        call()
    else:
        tf.cond(active, call, lambda: tf.zeros((), tf.float64))


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def spare_core() -> bool:
    """TF's thread pools leave a CPU of this process free for our threads (the store's writer, the
    host worker): both the intra-op and the inter-op pool are smaller than the CPUs (a setting of
    0, TF's default, is all CPUs)."""
    cpus = usable_cpus()
    pools = (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )
    return all(0 < threads < cpus for threads in pools)


def one_replica(model: Any) -> bool:
    """The model trains on one replica: no distribution strategy splits its step (each replica's
    ``numpy_function`` would write the same host tables)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is None or int(getattr(strategy, "num_replicas_in_sync", 1)) == 1


def _flat(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1)


def _kernel_dtype(a: np.ndarray) -> type:
    return np.float64 if np.asarray(a).dtype == np.float64 else np.float32


def host_statistics(*grads: np.ndarray) -> np.ndarray:
    """``(n, 6)`` float64 rows (:data:`GRAD_STATS` order) of the dense gradients, one kernel call;
    the rows the one-pass variance or the range of the sums cannot give exactly (and rows with
    NaN/Inf) recomputed by the PyTorch monitor's exact redo
    (:func:`~bbdecoder.monitor.grad_stats.small_statistics`, on float64 copies)."""
    arrays = [_flat(g) for g in grads]
    found = array_statistics(arrays)
    if found is None:
        rows, redo = np.empty((len(arrays), len(GRAD_STATS))), list(range(len(arrays)))
    else:
        rows, redo = found
    if redo:
        rows[redo] = small_statistics([torch.from_numpy(arrays[i].astype(np.float64)) for i in redo])
    return rows


class HostRatios:
    """Update ratios ``||W_after - W_before|| / ||W_before||`` (``||W_after - W_before||`` where
    ``||W_before|| = 0``) against a host snapshot of each tracked weight (by buffer row), taken by
    :meth:`add` and rewritten by every call: a ratio measures what changed the weight since the
    previous step's update (the optimizer's step, and anything a callback did in between)."""

    def __init__(self) -> None:
        self.snapshots: dict[int, np.ndarray] = {}
        self.norms: dict[int, float] = {}

    def add(self, initial: dict[int, np.ndarray]) -> None:
        """Snapshots of the weights of more rows (their values before their first update)."""
        for row, w in initial.items():
            snapshot = self.snapshots[row] = _flat(np.array(w, dtype=_kernel_dtype(w)))
            wide = snapshot.astype(np.float64)
            self.norms[row] = math.sqrt(float(np.dot(wide, wide)))

    def remember(self, rows: list[int], *weights: np.ndarray) -> None:
        """Rewrite the snapshots of ``rows`` with ``weights`` (the step before a recorded one, with
        ``every > 1``: the next ratio compares against these)."""
        snapshots = [self.snapshots[r] for r in rows]
        squares = cpu_reductions.update_norms([_flat(w) for w in weights], snapshots, True)
        for row, (_, after) in zip(rows, squares, strict=True):
            self.norms[row] = math.sqrt(after)

    def __call__(self, rows: list[int], *weights: np.ndarray) -> np.ndarray:
        """The ``(n,)`` float64 ratios of the weights of ``rows`` after this step's update."""
        snapshots = [self.snapshots[r] for r in rows]
        squares = cpu_reductions.update_norms([_flat(w) for w in weights], snapshots, True)
        ratios = np.empty(len(rows))
        for i, (row, (delta, after)) in enumerate(zip(rows, squares, strict=True)):
            size, before = math.sqrt(delta), self.norms[row]
            ratios[i] = size / before if before > 0 else size
            self.norms[row] = math.sqrt(after)
        return ratios


class HostStep:
    """The step tables of a ``fit`` on the host: ``table`` ``(k, n, 8)`` float64 (the six
    statistics, the update ratio, the finiteness flag; NaN where a variable got no gradient),
    ``losses`` ``(k,)``, and ``count``, the steps recorded so far (slot ``count % k`` is next).

    :meth:`record` is the step's ``numpy_function``: the statistics there, from the gradients just
    computed. The ratio pass reads every weight and its snapshot and rewrites the snapshot (three
    times the bytes of the statistics). With ``aside`` (a core TF's threads leave free,
    :func:`spare_core`) it waits in ``after`` (by step number: the updated weights, zero-copy views
    that keep TF's buffers) until :meth:`measure` runs it, on the store's writer thread while the next step's
    forward and backward pass run; should the next update come first, TF copies the buffer before
    writing it (a buffer still referenced is copied on write), so the pass still reads this step's
    weights. Without a spare core it runs in :meth:`record`, after the statistics (a pass beside
    TF's threads would make every parallel region of theirs wait for it); with ``beside`` (a
    :data:`Submit` of another thread, on two or more CPUs) during them, on that thread, while TF's
    own threads wait for the ``numpy_function``. The numbers are the same bits either way.

    With ``every > 1`` only steps numbered ``first + count`` a multiple of ``every`` are recorded
    (:meth:`recorded`); the step before one rewrites the snapshots (its weights are the recorded
    step's ``W_before``), and the capture calls the host on no other step (:meth:`record_at`, under
    a ``tf.cond``). Both passes then run in the step: the snapshot written there must not race a
    pass still waiting for the writer thread."""

    def __init__(
        self,
        n: int,
        k: int,
        *,
        gradients: bool,
        weights: bool,
        aside: bool = True,
        beside: Submit | None = None,
        every: int = 1,
        first: int = 0,
    ) -> None:
        self.k, self.gradients, self.weights = k, gradients, weights
        self.every, self.first = every, first
        self.aside = aside and every == 1
        self.beside = None if self.aside else beside
        self.table = np.full((k, n, COLUMNS), np.nan)
        self.losses = np.full(k, np.nan)
        self.count = 0
        self.ratios = HostRatios()
        # by step number, not slot: a slot can be rewritten before the writer thread reads it
        self.after: dict[int, tuple[list[int], tuple[np.ndarray, ...]]] = {}

    def record(
        self, rows: list[int], n_grads: int, loss: np.ndarray, inv: np.ndarray, *arrays: np.ndarray
    ) -> np.ndarray:
        """One ``apply``: ``arrays`` are the gradients of ``rows`` (``n_grads``), then, when update
        ratios are recorded, the weights after the update; ``inv``: 1 / the loss scale."""
        slot = self.count % self.k
        table = self.table[slot]
        table.fill(np.nan)
        if not self.recorded(self.count):
            if self.weights and rows and self.recorded(self.count + 1):
                self.ratios.remember(rows, *arrays[n_grads:])
            self.losses[slot] = np.nan
            self.count += 1
            return np.zeros((), dtype=np.float64)
        beside = self._ratios_beside(rows, arrays[n_grads:])
        try:
            if rows:
                self._statistics(table, rows, float(inv), arrays[:n_grads])
        except BaseException:
            if beside is not None:
                beside.exception()  # the pass on the other thread is over before the error leaves
            raise
        if self.weights and rows and self.aside:
            self.after[self.count] = (rows, arrays[n_grads:])
        elif beside is not None:
            table[rows, RATIO] = beside.result()
        elif self.weights and rows:
            table[rows, RATIO] = self.ratios(rows, *arrays[n_grads:])
        self.losses[slot] = float(loss)
        self.count += 1
        return np.zeros((), dtype=np.float64)

    def _statistics(
        self, table: np.ndarray, rows: list[int], scale: float, grads: tuple[np.ndarray, ...]
    ) -> None:
        stats = host_statistics(*grads)  # also with gradients=False: the finiteness flag
        table[rows, FINITE] = ~(np.isnan(stats[:, 4]) | (stats[:, 2] == np.inf))
        if self.gradients:
            if scale != 1.0:
                stats = stats * np.array([scale, scale, scale, scale * scale, scale, scale])
            table[rows, :NSTATS] = stats

    def _ratios_beside(self, rows: list[int], weights: tuple[np.ndarray, ...]) -> Future[np.ndarray] | None:
        """The ratio pass of this step started on ``beside`` 's thread, or ``None`` (no such thread,
        or the pass runs aside or not at all)."""
        if self.beside is None or not (self.weights and rows):
            return None
        return self.beside(partial(self.ratios, rows, *weights))

    def record_at(self, rows: list[int], n_grads: int, count: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        """:meth:`record` of the ``count``-th step (``every > 1``: the host sees only some steps)."""
        self.count = int(count)
        return self.record(rows, n_grads, *rest)

    def recorded(self, count: int) -> bool:
        """Whether the ``count``-th step of this ``fit`` (from 0) is recorded."""
        return (self.first + count) % self.every == 0

    def measure(self, step: int, into: np.ndarray) -> None:
        """The ratio pass of step number ``step`` (``count`` when it was recorded), into the
        ``RATIO`` column of ``into`` (that step's ``(n, 8)`` table as :meth:`StepCapture.read`
        handed it out); releases the views. Passes must run in step order (each rewrites the
        snapshot the next compares against): the writer thread runs them in the order handed."""
        pending = self.after.pop(step, None)
        if pending is None:
            return
        rows, weights = pending
        into[rows, RATIO] = self.ratios(rows, *weights)


class HostProbe:
    """One watched layer's activation state on the host, ``probe_update`` 's arrays: ``max``
    ``(C,)`` float32 and the float64 counters ``saturated``, ``total``, ``channel_var``,
    ``forwards``; ``rules``: the saturation test as ``(op, bound)`` comparisons (``[]``: none);
    ``aside``: where :meth:`soon` runs the update (the host worker, with a spare core). The state
    is read once the updates handed over are done (the worker's ``wait``)."""

    def __init__(
        self, channels: int, inner: int, rules: list[tuple[str, float]], aside: Runner | None = None
    ) -> None:
        self.channels, self.inner, self.aside = channels, inner, aside
        self.rules = [(RULE_OPS[op], bound) for op, bound in rules]
        self.max = np.full(channels, -np.inf, dtype=np.float32)
        self.counters = [np.zeros((), dtype=np.float64) for _ in range(4)]

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """Add one forward's output ``(outer, C, inner)`` in memory order (any leading shape)."""
        kernels = cpu_reductions.FUSED
        assert kernels is not None
        kernels.probe_update(
            np.ascontiguousarray(y), self.channels, self.inner, self.rules, [self.max], self.counters
        )
        return np.zeros((), dtype=np.float64)

    def soon(self, y: np.ndarray) -> np.ndarray:
        """:meth:`__call__` on the ``aside`` thread, after the updates handed there before it."""
        assert self.aside is not None
        self.aside(partial(self, y))
        return np.zeros((), dtype=np.float64)

    def state(self) -> list[np.ndarray]:
        """``[max (C,), saturated, total, channel_var, forwards]`` as float64 arrays."""
        return [self.max.astype(np.float64), *(c.reshape(1) for c in self.counters)]

    def reset(self) -> None:
        self.max.fill(-np.inf)
        for c in self.counters:
            c.fill(0.0)
