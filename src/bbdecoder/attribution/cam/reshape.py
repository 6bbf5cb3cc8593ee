"""Layer outputs that are not channel-first feature maps: channels-last maps and token sequences.

Every CAM works on ``(N, C, *spatial)``. ``reshape=`` turns a layer's output (and, identically, its
gradient) into that layout: a callable ``f(tensor) -> (N, C, *spatial)`` (pytorch-grad-cam's
``reshape_transform``), ``"channels_last"`` for ``(N, *spatial, C)`` (Swin stages, ConvNeXt
internals) or ``"tokens"`` / :func:`tokens` for ``(N, L, C)`` token sequences on a grid (ViT, with
``prefix`` leading tokens such as a class token dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ReshapeFn = Callable[[torch.Tensor], torch.Tensor]


class Reshape:
    """A built-in reshape: ``apply(tensor, input_spatial)`` sees the input's spatial size too."""

    def apply(self, tensor: torch.Tensor, input_spatial: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.apply(tensor, ())


@dataclass(frozen=True)
class ChannelsLast(Reshape):
    """``(N, *spatial, C)`` -> ``(N, C, *spatial)``."""

    def apply(self, tensor: torch.Tensor, input_spatial: tuple[int, ...]) -> torch.Tensor:
        if tensor.dim() < 3:
            raise ValueError(
                f"channels_last needs an output (N, *spatial, C), got shape {tuple(tensor.shape)}"
            )
        return tensor.movedim(-1, 1)


@dataclass(frozen=True)
class Tokens(Reshape):
    """``(N, prefix + h * w, C)`` -> ``(N, C, h, w)``, dropping the first ``prefix`` tokens.

    ``grid=(h, w)`` fixes the grid; ``None`` infers it from the token count and the input's aspect
    ratio (a square grid for a square input).
    """

    prefix: int = 0
    grid: tuple[int, ...] | None = None

    def apply(self, tensor: torch.Tensor, input_spatial: tuple[int, ...]) -> torch.Tensor:
        if tensor.dim() != 3:
            raise ValueError(f"tokens() needs an output (N, L, C), got shape {tuple(tensor.shape)}")
        count = tensor.shape[1] - self.prefix
        grid = self.grid if self.grid is not None else infer_grid(count, input_spatial)
        if count <= 0 or math.prod(grid) != count or (self.grid is None and not _fits(grid, input_spatial)):
            raise ValueError(
                f"{tensor.shape[1]} tokens minus prefix={self.prefix} do not fill a grid shaped like the "
                f"input {input_spatial} (best {grid}); set tokens(prefix=..., grid=(h, w)) "
                "(a class token: prefix=1)"
            )
        patches = tensor[:, self.prefix :, :]
        return patches.reshape(tensor.shape[0], *grid, tensor.shape[2]).movedim(-1, 1)


def tokens(prefix: int = 0, grid: Sequence[int] | None = None) -> Tokens:
    """A reshape for token sequences ``(N, L, C)``: ``prefix`` leading tokens (a class token: 1) are
    dropped, the rest laid on ``grid`` (inferred when ``None``)."""
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
        raise ValueError(f"prefix must be an int >= 0, got {prefix!r}")
    return Tokens(prefix, None if grid is None else tuple(int(g) for g in grid))


def channels_last() -> ChannelsLast:
    """A reshape for channels-last outputs ``(N, *spatial, C)``."""
    return ChannelsLast()


def infer_grid(count: int, input_spatial: tuple[int, ...]) -> tuple[int, int]:
    """The ``(h, w)`` with ``h * w == count`` whose aspect ratio is closest to the input's."""
    if count <= 0:
        return (0, 0)
    ratio = input_spatial[0] / input_spatial[1] if len(input_spatial) == 2 and input_spatial[1] else 1.0
    best = (1, count)
    for h in range(1, math.isqrt(count) + 1):
        if count % h:
            continue
        for pair in ((h, count // h), (count // h, h)):
            if abs(math.log(pair[0] / pair[1] / ratio)) < abs(math.log(best[0] / best[1] / ratio)):
                best = pair
    return best


def _fits(grid: tuple[int, ...], input_spatial: tuple[int, ...]) -> bool:
    """Whether ``grid`` has about the input's aspect ratio (strides within a factor 2 of each other)."""
    if len(input_spatial) != len(grid):
        return len(input_spatial) == 0
    strides = [i / g for i, g in zip(input_spatial, grid, strict=True)]
    return max(strides) / min(strides) <= 2.0


ReshapeLike = ReshapeFn | str | None


def resolve_reshape(reshape: ReshapeLike) -> Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor] | None:
    """``reshape=`` as ``f(tensor, input_spatial)``, or ``None`` for channel-first outputs."""
    if reshape is None:
        return None
    if isinstance(reshape, str):
        builtins = {"channels_last": ChannelsLast(), "tokens": Tokens()}
        if reshape not in builtins:
            raise ValueError(
                f"unknown reshape {reshape!r}; use 'channels_last', 'tokens', tokens(prefix=1) or a callable"
            )
        reshape = builtins[reshape]
    if isinstance(reshape, Reshape):
        return reshape.apply
    if not callable(reshape):
        raise TypeError(
            f"reshape must be a callable, 'channels_last' or 'tokens', got {type(reshape).__name__}"
        )
    user_fn = reshape
    return lambda tensor, _spatial: user_fn(tensor)
