"""Capture the attention weights of a transformer, whatever attention kernel it runs.

Two kinds of models are understood:

* **Hugging Face transformers** models: the attention modules are those the model lists in
  ``_can_record_outputs["attentions"]``; they return ``(output, weights)``, but fused kernels
  (``attn_implementation="sdpa"``, flash, flex) return no weights. For the duration of the capture
  every ``config._attn_implementation`` of the model is set to ``"eager"`` and then restored.
* **torch's** ``nn.MultiheadAttention`` (``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and any
  model calling it): each call is left as it is (its ``need_weights`` / ``average_attn_weights``,
  its kernel); a forward hook reads the call's arguments and :func:`mha_attention_weights`
  recomputes the per-head weights from its query, key and masks, and ``V`` from its value. The
  gradient of a map comes from the gradient of the call's output ``O = concat_h(A_h V_h) W_o^T + b``:
  ``dS/dA_h = (dS/dO W_o)_h V_h^T``. torch's fused fast paths (``torch.backends.mha``), which skip
  the module inside ``nn.TransformerEncoderLayer``, are switched off for the capture and restored.
* **timm-style / plain-torch** attention blocks: a module with a ``qkv`` ``nn.Linear`` and an int
  ``num_heads`` (timm's ``Attention``). The weights are recomputed from the ``qkv`` output as
  ``softmax(q k^T * scale)`` (``q_norm``/``k_norm`` applied when the block has them), whatever kernel
  the block runs; their gradient comes from the gradient of the output projection's input
  ``O = A V``: ``dS/dA_h = dS/dO_h V_h^T``.

Nothing of the model is replaced; every hook goes through the caller's :class:`HookManager` and the
attention implementation is restored on exit, also when the forward pass fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.hooks import HookManager


class AttentionCaptureError(RuntimeError):
    """The model's attention weights cannot be captured (the message says why and what to do)."""


@dataclass
class _QKVRecord:
    module: nn.Module
    weights: torch.Tensor  # (N, H, T, T), recomputed, detached
    values: torch.Tensor  # (N, H, T, d), detached
    proj_input: torch.Tensor | None = None  # (N, T, H*d), in the graph


@dataclass
class _MHARecord:
    module: nn.MultiheadAttention
    weights: torch.Tensor  # (N, H, L, S), recomputed, detached
    values: torch.Tensor  # (N, H, S, d), detached
    output: torch.Tensor  # the call's attention output, in the graph ((N, L, E) or (L, N, E))


@dataclass
class CapturedAttention:
    """What one forward pass left: one entry per attention call, in execution order."""

    weights: list[torch.Tensor] = field(default_factory=list)  # (N, H, T, T) each
    _graph: list[torch.Tensor] = field(default_factory=list)  # HF path: weights in the graph
    _qkv: list[_QKVRecord] = field(default_factory=list)
    _mha: list[_MHARecord] = field(default_factory=list)

    def gradients(self, score: torch.Tensor) -> list[torch.Tensor]:
        """``d score / d A`` for every captured attention map (N, H, T, T), in execution order."""
        if self._mha:
            return self._mha_gradients(score)
        if self._graph:
            grads = torch.autograd.grad(score, self._graph, allow_unused=True)
            return [
                torch.zeros_like(w) if g is None else g.detach()
                for w, g in zip(self._graph, grads, strict=True)
            ]
        inputs = [r.proj_input for r in self._qkv]
        if any(t is None for t in inputs):
            raise AttentionCaptureError(
                "the gradient of the attention weights needs the input of each attention block's `proj` "
                "Linear (O = A V); this block has no `proj` or a norm between A V and `proj`"
            )
        grads = torch.autograd.grad(score, inputs, allow_unused=True)  # type: ignore[arg-type]
        out = []
        for record, grad in zip(self._qkv, grads, strict=True):
            n, h, t, d = record.values.shape
            if grad is None:
                out.append(torch.zeros_like(record.weights))
                continue
            d_o = grad.detach().reshape(n, t, h, d).transpose(1, 2)  # (N, H, T, d)
            out.append(d_o.to(record.values.dtype) @ record.values.transpose(-1, -2))
        return out

    def _mha_gradients(self, score: torch.Tensor) -> list[torch.Tensor]:
        """``O = concat_h(A_h V_h) W_o^T + b``, so ``dS/dA_h = (dS/dO W_o)_h V_h^T``."""
        grads = torch.autograd.grad(score, [r.output for r in self._mha], allow_unused=True)
        out = []
        for record, grad in zip(self._mha, grads, strict=True):
            if grad is None:
                out.append(torch.zeros_like(record.weights))
                continue
            n, heads, length, _ = record.weights.shape
            g = grad.detach().float()
            if g.dim() == 2:
                g = g.unsqueeze(0)
            elif not record.module.batch_first:
                g = g.transpose(0, 1)  # (N, L, E)
            d_concat = g @ record.module.out_proj.weight.detach().float()
            d_heads = d_concat.reshape(n, length, heads, -1).transpose(1, 2)  # (N, H, L, d)
            out.append(d_heads @ record.values.transpose(-1, -2))
        return out


def _hf_attention_classes(model: nn.Module) -> list[tuple[type[nn.Module], int, str | None]]:
    found: list[tuple[type[nn.Module], int, str | None]] = []
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(spec, dict) or "attentions" not in spec:
            continue
        entries = spec["attentions"]
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            if isinstance(entry, type):
                item = (entry, 1, None)
            elif isinstance(getattr(entry, "target_class", None), type):
                item = (
                    entry.target_class,
                    int(getattr(entry, "index", 1)),
                    getattr(entry, "layer_name", None),
                )
            else:
                continue
            if item not in found:
                found.append(item)
    return found


def hf_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, index of the weights in its output)`` of every Hugging Face attention module."""
    found = []
    for cls, index, layer_name in _hf_attention_classes(model):
        for name, module in model.named_modules():
            if isinstance(module, cls) and (layer_name is None or name.endswith(layer_name)):
                found.append((name, module, index))
    return found


def attention_implementations(model: nn.Module) -> set[str | None]:
    """The ``config._attn_implementation`` values of the Hugging Face configs in ``model``."""
    return {c._attn_implementation_internal for c in _configs(model)}


def recompute_attention(block: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale)`` (N, H, T, T) and ``v`` (N, H, T, d) from a timm-style ``qkv`` output."""
    return _recompute(block, qkv)


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config (and sub-config) with an attention implementation in ``model``."""
    seen: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            stack.append(getattr(config, key, None))
    return list(seen.values())


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Set every Hugging Face config of ``model`` to eager attention; restore them on exit."""
    configs = _configs(model)
    saved = [(c, c._attn_implementation_internal) for c in configs]
    try:
        for config in configs:
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value


_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def mha_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """``(name, module)`` of every ``nn.MultiheadAttention`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def mha_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one ``nn.MultiheadAttention`` call by name (positional ones named)."""
    named = dict(zip(_MHA_ARGS, args, strict=False))
    named.update(kwargs)
    return named


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as 0 / -inf, a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def mha_attention_weights(module: nn.MultiheadAttention, call: dict[str, Any]) -> torch.Tensor:
    """The per-head attention weights ``(N, H, L, S)`` of one ``nn.MultiheadAttention`` call, recomputed
    from its query, key and masks as ``softmax(q k^T / sqrt(d) + masks)`` (before dropout).

    ``call``: the call's arguments by name (:func:`mha_call`). Raises :class:`AttentionCaptureError`
    for ``add_bias_kv`` / ``add_zero_attn`` modules (extra key columns not supported here).
    """
    if module.bias_k is not None or module.add_zero_attn:
        raise AttentionCaptureError(
            "recomputing nn.MultiheadAttention weights does not support add_bias_kv or add_zero_attn; "
            "pass attention=False"
        )
    query, key = call["query"], call["key"]
    batched = query.dim() == 3
    if not batched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)  # (L, E) -> (L, 1, E)
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    length, n, embed = query.shape
    source = key.shape[0]
    heads = module.num_heads
    d = embed // heads
    if module._qkv_same_embed_dim:
        assert module.in_proj_weight is not None
        w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
    else:
        assert module.q_proj_weight is not None and module.k_proj_weight is not None
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    b_q = b_k = None
    if module.in_proj_bias is not None:
        b_q, b_k = module.in_proj_bias[:embed], module.in_proj_bias[embed : 2 * embed]
    q = F.linear(query, w_q, b_q).reshape(length, n * heads, d).transpose(0, 1)
    k = F.linear(key, w_k, b_k).reshape(source, n * heads, d).transpose(0, 1)
    logits = (q.float() @ k.float().transpose(1, 2)) * d**-0.5  # (N*H, L, S)
    logits = logits.view(n, heads, length, source)
    attn_mask = call.get("attn_mask")
    if call.get("is_causal") and attn_mask is None:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=logits.device).triu(1)
    extra = _additive(attn_mask, logits.dtype)
    if extra is not None:
        logits = logits + (extra.view(n, heads, length, source) if extra.dim() == 3 else extra)
    padding = _additive(call.get("key_padding_mask"), logits.dtype)
    if padding is not None:
        logits = logits + padding.reshape(n, 1, 1, source)
    return torch.softmax(logits, dim=-1)


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """``torch.backends.mha`` fast paths off (they bypass ``nn.MultiheadAttention.forward`` and its
    hooks inside ``nn.TransformerEncoderLayer``); the previous setting restored on exit."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _mha_values(module: nn.MultiheadAttention, call: dict[str, Any]) -> torch.Tensor:
    """The value projection ``V`` (N, H, S, d) of one call, detached."""
    value = call["value"]
    if value.dim() == 2:
        value = value.unsqueeze(1)
    elif module.batch_first:
        value = value.transpose(0, 1)
    source, n, embed = value.shape
    heads = module.num_heads
    if module._qkv_same_embed_dim:
        assert module.in_proj_weight is not None
        weight = module.in_proj_weight[2 * embed :]
    else:
        assert module.v_proj_weight is not None
        weight = module.v_proj_weight
    bias = module.in_proj_bias[2 * embed :] if module.in_proj_bias is not None else None
    v = F.linear(value.detach(), weight.detach(), None if bias is None else bias.detach())
    return v.float().reshape(source, n, heads, embed // heads).permute(1, 2, 0, 3)


def _capture_mha(
    modules: list[tuple[str, nn.MultiheadAttention]], hooks: HookManager, captured: CapturedAttention
) -> None:
    """Per call, the weights and ``V`` recomputed from the call's inputs; the call itself untouched."""

    def after(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        call = mha_call(args, kwargs)
        with torch.no_grad():
            weights = mha_attention_weights(module, call)
            values = _mha_values(module, call)
        out = output[0] if isinstance(output, (tuple, list)) else output
        captured._mha.append(_MHARecord(module, weights, values, out))
        captured.weights.append(weights)

    for name, module in modules:
        if module.bias_k is not None or module.add_zero_attn:
            raise AttentionCaptureError(
                f"nn.MultiheadAttention {name!r} was built with add_bias_kv or add_zero_attn, which add key "
                "columns without a token: its attention is not a token-to-token matrix and cannot be rolled "
                "out; explain this model with a gradient method (IntegratedGradients, GradCAM) instead"
            )
        hooks.forward_hook(module, after, with_kwargs=True)


def qkv_blocks(model: nn.Module) -> list[nn.Module]:
    """The timm-style attention blocks of ``model``: a ``qkv`` Linear and an int ``num_heads``."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    ]


def _recompute(module: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    heads = int(module.num_heads)  # type: ignore[arg-type]
    n, t, three_c = qkv.shape
    d = three_c // (3 * heads)
    parts = qkv.detach().reshape(n, t, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = parts.unbind(0)
    for name, tensor in (("q_norm", q), ("k_norm", k)):
        norm = getattr(module, name, None)
        if isinstance(norm, nn.Module):
            if name == "q_norm":
                q = norm(tensor)
            else:
                k = norm(tensor)
    scale = getattr(module, "scale", None)
    scale = float(scale) if isinstance(scale, (int, float)) else d**-0.5
    wide = _at_least_float32(q.dtype)  # half precision is widened; float64 models stay float64
    weights = torch.softmax((q.to(wide) * scale) @ k.to(wide).transpose(-1, -2), dim=-1)
    return weights, v.to(wide)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@contextlib.contextmanager
def capture_attention(model: nn.Module, hooks: HookManager) -> Iterator[CapturedAttention]:
    """Within this block, every forward pass of ``model`` appends its attention maps to the yielded
    :class:`CapturedAttention` (hooks registered on ``hooks``; the caller removes them)."""
    captured = CapturedAttention()
    hf = _hf_attention_classes(model)
    if hf:
        names = {m: n for n, m in model.named_modules()}

        def make(index: int) -> Any:
            def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
                weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
                if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
                    raise AttentionCaptureError(
                        f"the attention module {names.get(module, type(module).__name__)!r} returned no "
                        "attention weights even with config._attn_implementation='eager'; this model's "
                        "attention cannot be captured"
                    )
                captured._graph.append(weights)
                captured.weights.append(weights.detach().to(_at_least_float32(weights.dtype)))

            return hook

        registered = 0
        for _name, module, index in hf_attention_modules(model):
            hooks.forward_hook(module, make(index))
            registered += 1
        if registered:
            with eager_attention(model):
                yield captured
            return
    mha = mha_modules(model)
    if mha:
        _capture_mha(mha, hooks, captured)
        with mha_fastpath_disabled():
            yield captured
        return
    blocks = qkv_blocks(model)
    if not blocks:
        raise AttentionCaptureError(
            f"found no attention weights to capture in {type(model).__name__}: it is neither a Hugging Face "
            "transformers model (attention modules listed in `_can_record_outputs['attentions']`), nor uses "
            "torch's nn.MultiheadAttention, nor has timm-style attention blocks (a `qkv` nn.Linear and an "
            "int `num_heads`); for other layouts have the attention module return its weights or compute "
            "the maps yourself"
        )
    for block in blocks:
        pending: list[_QKVRecord] = []

        def on_qkv(
            _m: nn.Module, _i: Any, out: torch.Tensor, block: nn.Module = block, pending: list = pending
        ) -> None:
            weights, values = _recompute(block, out)
            record = _QKVRecord(block, weights, values)
            pending.append(record)
            captured._qkv.append(record)
            captured.weights.append(weights)

        def on_proj(_m: nn.Module, args: tuple[Any, ...], pending: list = pending) -> None:
            if pending and isinstance(args[0], torch.Tensor):
                pending.pop(0).proj_input = args[0]

        qkv = block.qkv
        assert isinstance(qkv, nn.Module)
        hooks.forward_hook(qkv, on_qkv)
        proj = getattr(block, "proj", None)
        norm = getattr(block, "norm", None)
        if isinstance(proj, nn.Module) and (norm is None or isinstance(norm, nn.Identity)):
            hooks.forward_pre_hook(proj, on_proj)
    yield captured


__all__ = [
    "AttentionCaptureError",
    "CapturedAttention",
    "attention_implementations",
    "capture_attention",
    "eager_attention",
    "hf_attention_modules",
    "mha_attention_weights",
    "mha_call",
    "mha_modules",
    "qkv_blocks",
    "recompute_attention",
]
