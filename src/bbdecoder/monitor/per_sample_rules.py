"""Per-sample gradients of one layer from its inputs and output gradients (no backward per sample).

Each rule turns one call of a module (its inputs, and the gradient of the batch loss w.r.t. its
output) into a per-sample representation of the gradient of each of its own parameters:

- :class:`Factored` (Linear and Conv weights): ``g_i = sum_groups G_i^T X_i`` with ``X_i`` the
  ``(L, a)`` inputs (unfolded patches for Conv) and ``G_i`` the ``(L, b)`` output gradients of
  sample ``i``. Squared norms come from ``sum_{l,l'} (X_i X_i^T)(G_i G_i^T)`` without forming
  ``g_i`` (the trick of BackPACK and Opacus' ghost clipping) when that costs less, i.e. when
  ``L (a + b) < a b`` (``B L^2 (a + b)`` against ``B L a b`` multiply-adds, and ``B L^2`` against
  ``B a b`` memory), else from the materialised ``g_i``.
- :class:`Rows` (Embedding weights): ``g_i`` scatters sample ``i``'s output gradients into the
  rows of its ids; squared norms come from the distinct (sample, id) pairs, never a ``(B, V, D)``
  tensor.
- :class:`Dense` (biases, and every other layer through ``torch.func``): ``(B, *param.shape)``.

All representations hold gradients of the *batch* loss; :mod:`bbdecoder.monitor.per_sample`
rescales them to per-sample-loss gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Factored:
    """``g_i = sum_k G[i, k]^T X[i, k]`` reshaped to ``shape``; ``X (B, K, L, a)``, ``G (B, K, L, b)``."""

    X: torch.Tensor
    G: torch.Tensor
    shape: torch.Size

    def cat(self, other: Factored) -> Factored:
        return Factored(torch.cat([self.X, other.X], 2), torch.cat([self.G, other.G], 2), self.shape)

    def dense(self) -> torch.Tensor:
        per = torch.einsum("bklc,bkla->bkca", self.G, self.X)
        return per.reshape(per.shape[0], *self.shape)

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(squared norm per sample (B,), sum over samples (shape))``."""
        _, _, length, a = self.X.shape
        b = self.G.shape[-1]
        if length * (a + b) < a * b:
            kx = self.X @ self.X.transpose(-1, -2)
            kg = self.G @ self.G.transpose(-1, -2)
            sq = (kx * kg).sum((1, 2, 3))
            total = torch.einsum("bklc,bkla->kca", self.G, self.X).reshape(self.shape)
            return sq, total
        per = self.dense()
        return per.flatten(1).pow(2).sum(1), per.sum(0)


@dataclass
class Rows:
    """Embedding gradient: sample ``i`` adds ``G[i, l]`` to row ``ids[i, l]``; ``ids (B, L)``,
    ``G (B, L, D)``, ``num_rows`` rows of the weight."""

    ids: torch.Tensor
    G: torch.Tensor
    num_rows: int

    def cat(self, other: Rows) -> Rows:
        return Rows(torch.cat([self.ids, other.ids], 1), torch.cat([self.G, other.G], 1), self.num_rows)

    def dense(self) -> torch.Tensor:
        batch, _, dim = self.G.shape
        out = self.G.new_zeros(batch, self.num_rows, dim)
        index = self.ids + torch.arange(batch, device=self.ids.device).unsqueeze(1) * self.num_rows
        out.view(-1, dim).index_add_(0, index.reshape(-1), self.G.reshape(-1, dim))
        return out

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = self.G.shape
        sample = torch.arange(batch, device=self.ids.device).unsqueeze(1).expand(batch, length)
        keys = (sample * self.num_rows + self.ids).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        summed = self.G.new_zeros(len(unique), dim).index_add_(0, inverse, self.G.reshape(-1, dim))
        sq = self.G.new_zeros(batch).index_add_(0, unique // self.num_rows, summed.pow(2).sum(1))
        total = self.G.new_zeros(self.num_rows, dim).index_add_(
            0, self.ids.reshape(-1), self.G.reshape(-1, dim)
        )
        return sq, total


@dataclass
class Dense:
    """Materialised per-sample gradients ``(B, *shape)``."""

    P: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.P

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.P.flatten(1).pow(2).sum(1), self.P.sum(0)


Representation = Factored | Rows | Dense


def combine(parts: list[Representation]) -> Representation:
    """One representation for several calls of a module in the same forward pass (weights used
    more than once: their per-sample gradients add up)."""
    first = parts[0]
    if all(type(p) is type(first) for p in parts) and not isinstance(first, Dense):
        out = first
        for p in parts[1:]:
            out = out.cat(p)  # type: ignore[arg-type]
        return out
    total = parts[0].dense()
    for p in parts[1:]:
        total = total + p.dense()
    return Dense(total)


class UnsupportedLayer(ValueError):
    """A layer whose per-sample gradients this module cannot compute exactly."""


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``(B, ..., D)`` -> ``(B, L, D)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def linear_rule(
    module: nn.Linear, x: torch.Tensor, g: torch.Tensor, names: list[str]
) -> dict[str, Representation]:
    if x.dim() < 2:
        raise UnsupportedLayer("a Linear on an unbatched 1-D input has no sample dimension")
    X, G = _tokens(x), _tokens(g)
    out: dict[str, Representation] = {}
    if "weight" in names:
        out["weight"] = Factored(X.unsqueeze(1), G.unsqueeze(1), module.weight.shape)
    if "bias" in names:
        out["bias"] = Dense(G.sum(1))
    return out


def conv_rule(
    module: nn.Conv1d | nn.Conv2d, x: torch.Tensor, g: torch.Tensor, names: list[str]
) -> dict[str, Representation]:
    expected = 3 if isinstance(module, nn.Conv1d) else 4
    if x.dim() != expected:
        raise UnsupportedLayer(f"{type(module).__name__} on an unbatched input has no sample dimension")
    if isinstance(module, nn.Conv1d):
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        pad = [*module._reversed_padding_repeated_twice, 0, 0]
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        pad = list(module._reversed_padding_repeated_twice)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    batch = x.shape[0]
    groups = module.groups
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, Cin*k, L)
    length = patches.shape[-1]
    if g.shape[-2] * g.shape[-1] != length:
        raise UnsupportedLayer(f"{type(module).__name__}: unfolded input and output sizes differ")
    X = patches.reshape(batch, groups, -1, length).transpose(-1, -2)  # (B, K, L, Cin/K*k)
    G = g.reshape(batch, groups, -1, length).transpose(-1, -2)  # (B, K, L, Cout/K)
    out: dict[str, Representation] = {}
    if "weight" in names:
        out["weight"] = Factored(X, G, module.weight.shape)
    if "bias" in names:
        out["bias"] = Dense(g.sum((2, 3)))
    return out


def embedding_rule(
    module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, names: list[str]
) -> dict[str, Representation]:
    if module.scale_grad_by_freq:
        raise UnsupportedLayer(
            "Embedding(scale_grad_by_freq=True) scales by counts over the whole batch, so one sample's "
            "gradient depends on the others"
        )
    if ids.dim() < 1 or "weight" not in names:
        raise UnsupportedLayer("an Embedding on a 0-dim index has no sample dimension")
    flat_ids = ids.reshape(ids.shape[0], -1)
    G = g.reshape(ids.shape[0], -1, g.shape[-1])
    if module.padding_idx is not None:
        G = G * (flat_ids != module.padding_idx).unsqueeze(-1).to(G.dtype)  # no gradient at padding_idx
    return {"weight": Rows(flat_ids, G, module.num_embeddings)}


def functional_rule(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], g: torch.Tensor, names: list[str]
) -> dict[str, Representation]:
    """Any module, by ``torch.func``: ``vmap`` over the samples of a ``vjp`` of the module's own
    forward (re-run on one sample at a time, batched), exact for layers without randomness and
    without interaction between the samples."""
    from torch.func import vjp, vmap
    from torch.nn.utils.stateless import _reparametrize_module

    # a sharded (FSDP2) parameter is gathered: a collective, made by every rank for the same calls
    # in the same order, since every rank reduces the same modules' captured calls
    params = {
        n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach()  # type: ignore[attr-defined]
        for n, p in module.named_parameters(recurse=False)
        if n in names
    }
    batch = g.shape[0]
    batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch for a in args]

    def one(sample_args: tuple[Any, ...], grad: torch.Tensor) -> dict[str, torch.Tensor]:
        full = tuple(a.unsqueeze(0) if b else a for a, b in zip(sample_args, batched, strict=True))

        def forward(p: dict[str, torch.Tensor]) -> torch.Tensor:
            # forward(), not __call__: the module's own hooks (ours included) must not run here
            with _reparametrize_module(module, p):
                out = module.forward(*full, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise UnsupportedLayer(f"{type(module).__name__} returns {type(out).__name__}, not a tensor")
            return out

        pullback = vjp(forward, params)[1]
        result: dict[str, torch.Tensor] = pullback(grad.unsqueeze(0))[0]
        return result

    in_dims = (tuple(0 if b else None for b in batched), 0)
    try:
        per = vmap(one, in_dims=in_dims)(tuple(args), g)
    except RuntimeError as err:
        if "random" in str(err).lower():
            raise UnsupportedLayer(
                f"{type(module).__name__}'s forward draws random numbers (dropout?), so re-running it per "
                "sample would not reproduce the training pass"
            ) from err
        raise
    return {n: Dense(per[n]) for n in names if n in per}


def rule_for(module: nn.Module) -> str:
    """The rule a module's parameters get: ``linear``, ``conv``, ``embedding`` or ``functional``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "functional"


def apply_rule(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], g: torch.Tensor, names: list[str]
) -> dict[str, Representation]:
    """Per-sample representations of ``names`` (the module's own parameter names) for one call."""
    kind = rule_for(module)
    if kind != "functional" and (not args or kwargs):
        kind = "functional"
    if kind == "linear":
        return linear_rule(module, args[0], g, names)  # type: ignore[arg-type]
    if kind == "conv":
        return conv_rule(module, args[0], g, names)  # type: ignore[arg-type]
    if kind == "embedding":
        return embedding_rule(module, args[0], g, names)  # type: ignore[arg-type]
    return functional_rule(module, args, kwargs, g, names)
