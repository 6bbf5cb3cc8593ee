"""Live logging: forward every row a :class:`~bbdecoder.store.RunWriter` receives to a sink."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from bbdecoder.sinks.names import metric_name
from bbdecoder.store.writer import RunWriter, ScalarRow


class Sink(Protocol):
    """Receives one step's metrics at a time, in ascending step order."""

    def log_step(self, step: int, metrics: dict[str, float], timestamp: float) -> None: ...

    def close(self) -> None: ...


class StepBuffer:
    """Collects named values per step and hands a step to the sink once a later step has begun (an
    update ratio of step k is recorded with step k + 1), or at :meth:`flush`."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._pending: dict[int, dict[str, float]] = {}
        self._times: dict[int, float] = {}

    def add(self, step: int, values: dict[str, float]) -> None:
        self._pending.setdefault(step, {}).update(values)
        self._times.setdefault(step, time.time())

    def release_before(self, step: int) -> None:
        for done in sorted(s for s in self._pending if s < step):
            self.sink.log_step(done, self._pending.pop(done), self._times.pop(done))

    def flush(self) -> None:
        self.release_before(1 << 62)


def attach_sink(writer: RunWriter, sink: Sink) -> StepBuffer:
    """Log everything ``writer`` receives from now on to ``sink`` (scalars and the loss); the sink is
    closed when the writer is. Wraps this writer object's ``add_scalars``, ``add_step`` and ``close``."""
    buffer = StepBuffer(sink)
    add_scalars, add_step, close = writer.add_scalars, writer.add_step, writer.close
    turns = writer.watchers_lock  # the writer thread's jobs and a user's log() both feed the buffer
    layer_names: dict[int, str] = {}

    def names(rows: Iterable[ScalarRow]) -> dict[int, dict[str, float]]:
        series = {sid: key for key, sid in writer._series.items()}
        stats = {sid: name for name, sid in writer._stats.items()}
        out: dict[int, dict[str, float]] = {}
        for step, _epoch, series_id, stat_id, value in rows:
            layer_id, param = series[series_id]
            if layer_id >= 0 and layer_id not in layer_names:
                layer_names.update(writer._conn.execute("SELECT layer_id, name FROM layers").fetchall())
            name = metric_name(stats[stat_id], layer_id, layer_names.get(layer_id, ""), param)
            out.setdefault(step, {})[name] = float(value)
        return out

    def scalars(rows: list[ScalarRow]) -> None:
        add_scalars(rows)
        with turns:
            by_step = names(rows)
            for step, values in by_step.items():
                buffer.add(step, values)
            if by_step:
                buffer.release_before(max(by_step))

    def step(step: int, epoch: int, loss: float | None) -> None:
        add_step(step, epoch, loss)
        with turns:
            buffer.release_before(step)
            if loss is not None:
                buffer.add(step, {"loss": float(loss)})

    def closing() -> None:
        close()
        buffer.flush()
        sink.close()

    writer.add_scalars = scalars  # type: ignore[method-assign]
    writer.add_step = step  # type: ignore[method-assign]
    writer.close = closing  # type: ignore[method-assign]
    return buffer
