"""Types of the optional C extension ``_fused.c`` (see :mod:`bbdecoder.monitor.cpu_reductions`)."""

from collections.abc import Sequence

import numpy as np

def moments(arrays: Sequence[np.ndarray], /) -> list[tuple[float, float, float, float]]: ...
def update_norms(
    weights: Sequence[np.ndarray],
    snapshots: Sequence[np.ndarray],
    keep: bool,
    into: Sequence[np.ndarray] | None = None,
    /,
) -> list[tuple[float, float]]: ...
