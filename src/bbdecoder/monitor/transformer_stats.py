"""The reductions and finders behind :class:`~bbdecoder.monitor.transformer_probes.TransformerProbes`:
activation RMS / max / kurtosis over non-pad tokens, attention-row entropy, the padding mask of a call,
and which modules are a model's transformer blocks. Pure functions of tensors and modules; no hooks."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def activation_stats(
    a: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rms, max |a|, kurtosis over the last dim averaged over the other dims)`` of ``a``, 0-d each.

    ``keep``: a boolean mask over ``a``'s leading dims (``(N, L)`` for ``(N, L, D)``): only those
    positions (the non-pad tokens) count.
    """
    a = a.detach().float()
    if keep is not None:
        a = a[keep.to(a.device)]
    rms = a.pow(2).mean().sqrt()
    max_abs = a.abs().amax()
    centered = a - a.mean(dim=-1, keepdim=True)
    m2 = centered.pow(2).mean(dim=-1)
    m4 = centered.pow(4).mean(dim=-1)
    kurtosis = (m4 / m2.clamp_min(torch.finfo(torch.float32).tiny).pow(2)).mean()
    return rms, max_abs, kurtosis


def attention_entropy(
    weights: torch.Tensor, query_keep: torch.Tensor | None = None, key_keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy per head (H,) of attention ``(N, H, Lq, Lk)``, averaged over samples and queries.

    ``key_keep`` ``(N, Lk)``: each row restricted to those keys and renormalised; ``query_keep``
    ``(N, Lq)``: the average over those query rows only (both boolean, True = a real token).
    """
    p = weights.detach().float()
    if key_keep is not None:
        p = p * key_keep.to(p.device, p.dtype)[:, None, None, :]
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # (N, H, Lq)
    if query_keep is None:
        return entropy.mean(dim=(0, 2))
    rows = query_keep.to(p.device, p.dtype)[:, None, :]
    return (entropy * rows).sum(dim=(0, 2)) / rows.sum(dim=(0, 2)).clamp_min(1.0)


def attention_mask_of(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``attention_mask`` (``N, L``) a model call received, as booleans (True = a real token)."""
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        try:
            names = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            names = []
        if "attention_mask" in names and names.index("attention_mask") < len(args):
            mask = args[names.index("attention_mask")]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    return None


def padding_keep(mask: Any) -> torch.Tensor | None:
    """A torch key-padding mask (True or ``-inf`` = padding) as booleans True = a real token."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return torch.isfinite(mask) if mask.dtype.is_floating_point else mask == 0


def kept_positions(keep: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """``keep`` (N, L) laid out like the leading dims of a hidden state: (N, L), or (L, N) (seq-first)."""
    if keep is None or len(shape) < 3:
        return None
    if tuple(shape[:2]) == tuple(keep.shape):
        return keep
    if tuple(shape[:2]) == tuple(keep.shape[::-1]):
        return keep.transpose(0, 1)
    return None


def hidden_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) and output.dim() >= 2 else None


def logits_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model``: Hugging Face's ``_can_record_outputs["hidden_states"]`` classes, else
    timm-style modules with ``attn`` and ``mlp`` children."""
    classes: list[type[nn.Module]] = []
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None)
        entry = spec.get("hidden_states") if isinstance(spec, dict) else None
        for item in entry if isinstance(entry, (list, tuple)) else [entry]:
            cls = item if isinstance(item, type) else getattr(item, "target_class", None)
            if isinstance(cls, type) and cls not in classes:
                classes.append(cls)
    named: list[tuple[str, nn.Module]] = list(model.named_modules())
    if classes:
        return [(n, m) for n, m in named if isinstance(m, tuple(classes))]
    torch_layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return [
        (n, m)
        for n, m in named
        if isinstance(m, torch_layers)
        or (isinstance(getattr(m, "attn", None), nn.Module) and hasattr(m, "mlp"))
    ]
