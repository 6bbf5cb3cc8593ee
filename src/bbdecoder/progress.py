"""Progress output that reads well in a terminal and in a log file.

In a terminal (the stream is a TTY) :func:`progress_bar` is a tqdm bar. Anywhere else (a CI log,
``make demo > log``, a notebook's captured stderr) tqdm would write every refresh as a new line of
carriage returns, so the bar is replaced by one plain line per finished stage, with the postfix
values of its last update and the elapsed time::

    epoch 1/4: 21/21 batches, loss=0.412, test_acc=0.913 (2.1 s)
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    """What the code that reports progress uses: ``update``, ``set_postfix``, ``close``."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


def is_terminal(stream: TextIO | None) -> bool:
    """True if ``stream`` is an interactive terminal (``isatty()``); False for files, pipes, None."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """A progress reporter for logs: nothing while it runs, one line when closed (or none if disabled)."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO | None, enabled: bool) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream, self.enabled = stream, enabled
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.enabled or self.stream is None:
            return
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        values = "".join(f", {key}={value}" for key, value in self.postfix.items())
        elapsed = time.perf_counter() - self.started
        print(f"{self.desc}: {count} {self.unit}{values} ({elapsed:.1f} s)", file=self.stream, flush=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def progress_bar(
    total: int | None,
    desc: str,
    *,
    unit: str = "it",
    enabled: bool = True,
    stream: TextIO | None = None,
) -> Progress:
    """A tqdm bar on ``stream`` (default ``sys.stderr``) when it is a terminal, else a
    :class:`PlainProgress` that prints one line when closed; ``enabled=False`` prints nothing."""
    stream = sys.stderr if stream is None else stream
    if enabled and is_terminal(stream):
        from tqdm.auto import tqdm

        bar: Progress = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=True)
        return bar
    return PlainProgress(total, desc, unit, stream, enabled)


def stage(message: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
    """Print one progress line (a stage of a long job starting) to ``stream`` (default stderr)."""
    if enabled:
        print(message, file=sys.stderr if stream is None else stream, flush=True)


__all__ = ["PlainProgress", "Progress", "is_terminal", "progress_bar", "stage"]
