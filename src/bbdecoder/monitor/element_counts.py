"""Counts of the elements that pass a comparison (``y > bound``, ``y <= bound``, ...): the
saturation counts of the activation probes.

On the CPU a tensor dense in memory is compared by NumPy into one reused boolean buffer and
counted by ``count_nonzero``: both vectorised, no allocation. Torch's CPU paths are slower here:
``(y > b).sum()`` and ``count_nonzero`` are unvectorised (4-20x), and a sum of signs needs a float
temporary as large as the output, which in a training loop the allocator hands back to the OS and
faults in again every step (on the MNIST CNN's 4.7 MB ReLU output: 2.1 ms in the step against
0.2 ms here; ``bench/profile_activation_probes.py``). Elsewhere (CUDA, other dtypes) and while
``torch.compile`` traces, the torch expression is used: compiled, it is one fused reduction.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch

from bbdecoder.monitor.cpu_reductions import flat_array

CHUNK = 1 << 24
"""Elements compared per NumPy call (a 16 MB boolean buffer at most); longer outputs go in pieces."""

_NUMPY: dict[str, Callable[..., np.ndarray]] = {
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
}
_TORCH: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}


class MaskBuffer:
    """One reused boolean buffer for the comparisons, grown on demand up to :data:`CHUNK` elements."""

    def __init__(self) -> None:
        self._mask = np.empty(0, dtype=np.bool_)

    def take(self, size: int) -> np.ndarray:
        """A boolean array of ``size`` (at most CHUNK) elements backed by the buffer."""
        if self._mask.size < size:
            self._mask = np.empty(size, dtype=np.bool_)
        return self._mask[:size]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self._mask.nbytes)


def count(y: torch.Tensor, op: str, bound: float, buffer: MaskBuffer | None = None) -> int | torch.Tensor:
    """The number of elements of ``y`` with ``y <op> bound`` (``op`` in ``gt``, ``ge``, ``lt``,
    ``le``; the bound cast to ``y``'s dtype, NaN never counted): a Python int on the NumPy path
    (``buffer`` given, a dense float32/float64 CPU tensor, not traced), else a 0-dim int64 tensor on
    ``y``'s device."""
    flat = None if buffer is None or torch.compiler.is_compiling() else flat_array(y)
    if buffer is None or flat is None:
        return _TORCH[op](y, bound).sum()
    compare = _NUMPY[op]
    total = 0
    for start in range(0, flat.size, CHUNK):
        piece = flat[start : start + CHUNK]
        total += int(np.count_nonzero(compare(piece, bound, out=buffer.take(piece.size))))
    return total
