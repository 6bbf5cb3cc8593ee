"""Types of the optional C extension (``monitor/csrc/``; see :mod:`bbdecoder.monitor.cpu_reductions`)."""

from collections.abc import Sequence

import numpy as np

def moments(arrays: Sequence[np.ndarray], threads: int = 1, /) -> list[tuple[float, float, float, float]]: ...
def statistics(
    arrays: Sequence[np.ndarray],
    known: Sequence[tuple[float, float, float, float] | None],
    condition: float,
    largest: float,
    smallest: float,
    threads: int = 1,
    /,
) -> tuple[bytearray, list[int]]: ...
def update_norms(
    weights: Sequence[np.ndarray],
    snapshots: Sequence[np.ndarray],
    keep: bool,
    into: Sequence[np.ndarray] | None = None,
    threads: int = 1,
    /,
) -> list[tuple[float, float]]: ...
def probe_update(
    y: np.ndarray,
    channels: int,
    inner: int,
    rules: Sequence[tuple[int, float]],
    maxima: Sequence[np.ndarray],
    scalars: Sequence[np.ndarray],
    threads: int = 1,
    /,
) -> None: ...
def probe_update_at(
    address: int,
    elements: int,
    wide: bool,
    channels: int,
    inner: int,
    rules: Sequence[tuple[int, float]],
    maxima: Sequence[np.ndarray],
    scalars: Sequence[np.ndarray],
    threads: int = 1,
    /,
) -> None: ...
def use_openmp(path: str, /) -> bool: ...
def norm_rules(
    table: np.ndarray,
    column: int,
    index: np.ndarray,
    window: np.ndarray,
    filled: np.ndarray,
    next_slot: np.ndarray,
    peak: np.ndarray,
    low_norm: np.ndarray,
    had_gradient: np.ndarray,
    exploding: np.ndarray,
    vanishing: np.ndarray,
    config: tuple[bool, float, float, int, bool, float, float, int],
    /,
) -> list[tuple[int, float, float, float, int]] | None: ...
def ratio_rules(
    table: np.ndarray,
    column: int,
    index: np.ndarray,
    low_ratio: np.ndarray,
    ratio_band: np.ndarray,
    config: tuple[float, float, int],
    /,
) -> list[tuple[int, int]] | None: ...
