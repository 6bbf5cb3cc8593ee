"""Weights & Biases: live logging (:class:`WandbSink`), export of a stored run (:func:`export_wandb`),
and :func:`read_wandb_offline`, which reads the series back from an offline run's ``.wandb`` file
without network or an account (used by the tests, handy to check an export before ``wandb sync``).

Needs ``wandb`` (``pip install bbdecoder[wandb]``). Without ``WANDB_MODE`` in the environment the
export runs offline; ``wandb sync DIR`` uploads it later.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

from bbdecoder.sinks.live import StepBuffer, attach_sink
from bbdecoder.sinks.stored import stored_steps
from bbdecoder.store.reader import RunReader, open_run
from bbdecoder.store.writer import RunWriter


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError("the W&B sink needs wandb: pip install wandb (or bbdecoder[wandb])") from err
    return wandb


class WandbSink:
    """Logs each step's metrics to one W&B run (``wandb.init(project=..., **init_kwargs)``); steps are
    handed over in ascending order, as W&B requires. ``WandbSink(...).attach(analyzer.writer)``."""

    def __init__(self, project: str = "bbdecoder", **init_kwargs: Any) -> None:
        wandb = _wandb()
        init_kwargs.setdefault("mode", os.environ.get("WANDB_MODE", "offline"))
        init_kwargs.setdefault("settings", wandb.Settings(console="off", silent=True))
        self.run = wandb.init(project=project, reinit="create_new", **init_kwargs)

    @property
    def dir(self) -> Path:
        """The run's local folder (``.../wandb/offline-run-*/files``' parent holds the ``.wandb`` file)."""
        return Path(self.run.dir).parent

    def log_step(self, step: int, metrics: dict[str, float], timestamp: float) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()
        if self.run.settings.mode == "offline":
            wait_until_written(self.dir)

    def attach(self, writer: RunWriter) -> StepBuffer:
        """Log every row ``writer`` receives from now on; the W&B run finishes when the writer closes."""
        return attach_sink(writer, self)


def export_wandb(
    run: str | Path | RunReader, project: str = "bbdecoder", name: str | None = None, **init_kwargs: Any
) -> Path:
    """Log a stored run to W&B (offline unless ``WANDB_MODE`` or ``mode=`` says otherwise); returns the
    W&B run's local folder."""
    reader = run if isinstance(run, RunReader) else open_run(run)
    try:
        config = reader.meta()
        sink = WandbSink(project, name=name or reader.path.parent.name, config=config, **init_kwargs)
        for step, metrics, timestamp in stored_steps(reader):
            sink.log_step(step, metrics, timestamp)
        sink.close()
    finally:
        if not isinstance(run, RunReader):
            reader.close()
    return sink.dir


_BLOCK = 32768
_HEADER = 7  # the file's ":W&B" + magic + version, and each record's crc32 + length + type


def _records(data: bytes) -> list[bytes]:
    """The records of a ``.wandb`` file (LevelDB log format: 32 KiB blocks, fragments typed FULL=1,
    FIRST=2, MIDDLE=3, LAST=4)."""
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file (no :W&B header)")
    out, pending, offset = [], b"", _HEADER
    while offset + _HEADER <= len(data):
        left = _BLOCK - offset % _BLOCK
        if left < _HEADER:
            offset += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + _HEADER])
        body = data[offset + _HEADER : offset + _HEADER + length]
        offset += _HEADER + length
        if kind == 1:
            out.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            out.append(pending + body)
            pending = b""
        elif kind == 0:  # zero padding up to the end of a block
            offset += -offset % _BLOCK
    return out


def _parsed(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    out = []
    for raw in _records(path.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        out.append(record)
    return out


def wait_until_written(run_dir: str | Path, timeout: float = 60.0) -> list[Any]:
    """The records of an offline run once its ``exit`` record is on disk (``run.finish()`` returns
    before W&B's service has written everything); raises ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        if files:
            records = _parsed(files[0])
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"the W&B run in {run_dir} was not completely written within {timeout} s")
        time.sleep(0.1)


def read_wandb_offline(run_dir: str | Path, timeout: float = 60.0) -> dict[str, list[tuple[int, float]]]:
    """Every logged series of a finished offline W&B run folder (holding ``run-*.wandb``):
    ``{key: [(step, value), ...]}`` in logging order (waits up to ``timeout`` s for the file)."""
    if not sorted(Path(run_dir).glob("run-*.wandb")) and not Path(run_dir).is_dir():
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    series: dict[str, list[tuple[int, float]]] = {}
    for record in wait_until_written(run_dir, timeout):
        if record.WhichOneof("record_type") != "history":
            continue
        step = int(record.history.step.num)
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            if key.startswith("_"):
                continue
            value = json.loads(item.value_json)  # NaN and Infinity parse too
            series.setdefault(key, []).append((step, float(value) if value is not None else float("nan")))
    return series
