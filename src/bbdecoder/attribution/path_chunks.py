"""The chunked walk along an Integrated Gradients path, shared by input-space and layer IG.

The ``N * n_steps`` path points are ordered step-major (row ``r`` is sample ``r % N`` at node
``r // N``) and cut into passes of at most ``rows_per_pass`` rows; each pass gets the nodes and
weights of its own steps only, so memory is bounded whatever ``n_steps`` is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bbdecoder.attribution.quadrature import quadrature_slice


@dataclass(frozen=True)
class PathChunk:
    """One pass: rows ``start:stop``, their ``sample`` indices (rows,) and ``path`` points
    (rows, *sample_shape), and the quadrature weights of steps ``first_step..`` it covers."""

    start: int
    stop: int
    first_step: int
    weights: list[float]
    sample: torch.Tensor
    path: torch.Tensor


def path_chunks(
    base: torch.Tensor, diff: torch.Tensor, method: str, n_steps: int, rows_per_pass: int
) -> Iterator[PathChunk]:
    """The passes over ``base + alpha * diff`` (both (N, ...)); ``path`` is built without gradients."""
    n = diff.shape[0]
    broadcast = (-1,) + (1,) * (diff.dim() - 1)
    for start in range(0, n * n_steps, rows_per_pass):
        stop = min(start + rows_per_pass, n * n_steps)
        first_step, last_step = start // n, (stop - 1) // n
        alphas, weights = quadrature_slice(method, n_steps, first_step, last_step + 1)
        alphas = alphas.to(dtype=diff.dtype, device=diff.device)
        row = torch.arange(start, stop, device=diff.device)
        sample, step = row % n, torch.div(row, n, rounding_mode="floor") - first_step
        with torch.no_grad():
            path = base[sample] + alphas[step].view(broadcast) * diff[sample]
        yield PathChunk(start, stop, first_step, weights.tolist(), sample, path)


def add_weighted(accumulated: torch.Tensor, grad: torch.Tensor, chunk: PathChunk) -> None:
    """Add the pass's gradients (rows, ...) into ``accumulated`` (N, ...), each row times its weight."""
    n = accumulated.shape[0]
    for offset, weight in enumerate(chunk.weights):
        s = chunk.first_step + offset
        lo, hi = max(chunk.start, s * n), min(chunk.stop, (s + 1) * n)
        accumulated[lo - s * n : hi - s * n].add_(grad[lo - chunk.start : hi - chunk.start], alpha=weight)
