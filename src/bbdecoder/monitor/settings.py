"""Argument checks of the Analyzer's settings, run before anything is opened or registered."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bbdecoder.validation import check_positive_int


def check_settings(
    flush_every: Any,
    histogram_bins: Any,
    quantiles: Any,
    channel_dim: Any,
    every: Any,
    eps: Any,
    threshold: Any,
) -> tuple[float, ...]:
    """Raise naming the bad argument; returns the quantiles as floats."""
    check_positive_int(flush_every, "flush_every")
    check_positive_int(histogram_bins, "histogram_bins")
    check_positive_int(every, "every")
    try:
        qs = tuple(float(q) for q in quantiles)
    except (TypeError, ValueError) as err:
        raise ValueError(f"quantiles must be numbers in [0, 1], got {quantiles!r}") from err
    bad = [q for q in qs if not 0.0 <= q <= 1.0]
    if bad or not qs:
        raise ValueError(f"quantiles must be a non-empty list of numbers in [0, 1], got {quantiles!r}")
    if channel_dim is not None and (not isinstance(channel_dim, int) or isinstance(channel_dim, bool)):
        raise TypeError(f"channel_dim must be an int or None (chosen per layer), got {channel_dim!r}")
    if not isinstance(eps, (int, float)) or not 0.0 <= eps < 0.5:
        raise ValueError(f"saturation_eps must be a number in [0, 0.5), got {eps!r}")
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"dead_threshold must be a number, got {threshold!r}")
    return qs


def check_alerts(alerts: Any) -> None:
    from bbdecoder.alerts import AlertConfig

    if not isinstance(alerts, (bool, AlertConfig)):
        raise TypeError(f"alerts= takes True, False or an AlertConfig, got {type(alerts).__name__}")


def check_tensorboard(tensorboard: Any) -> None:
    if tensorboard is not None and not isinstance(tensorboard, (bool, str, Path)):
        from bbdecoder.monitor.tensorboard import TensorBoardLogger

        if not isinstance(tensorboard, TensorBoardLogger):
            raise TypeError(
                "tensorboard= takes True, a log folder or a TensorBoardLogger, got "
                f"{type(tensorboard).__name__}"
            )


def alert_engine(alerts: Any, writer: Any) -> Any:
    """The alert rules watching ``writer``; None when turned off and on ranks that do not write."""
    from bbdecoder.alerts import AlertEngine
    from bbdecoder.store.writer import RunWriter

    if alerts is False or not isinstance(writer, RunWriter):
        return None
    return AlertEngine(None if alerts is True else alerts).attach(writer)
