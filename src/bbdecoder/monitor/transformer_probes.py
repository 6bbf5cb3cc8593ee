"""Opt-in probes of transformer training, written to an :class:`~bbdecoder.monitor.Analyzer`'s run store.

What people watch when a transformer trains, beside the gradients:

- per block output ``a`` (the hidden states a block returns): ``act_rms = sqrt(mean(a^2))``,
  ``act_max_abs = max |a|`` and ``act_kurtosis``, the Pearson kurtosis ``E[(a-mu)^4] / E[(a-mu)^2]^2``
  over the hidden dimension of each token, averaged over tokens (3 for Gaussian features; large
  values mean outlier features, Bondarenko et al. 2023);
- per attention head: ``attn_entropy``, the entropy ``-sum_j p_ij log p_ij`` (nats) of each query's
  attention row, averaged over queries and samples (from eager attention weights);
- the model's output logits: ``logit_mean`` and ``logit_max``.

Padding is left out: with an ``attention_mask`` (``N, L``, nonzero = a real token) passed to the
model, or a ``src_key_padding_mask`` / ``key_padding_mask`` (True or ``-inf`` = padding) passed to a
torch ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``, the activation statistics are over
the non-pad positions only, and the attention entropy over the non-pad query rows, each row
restricted to the non-pad keys (renormalised to sum 1; a model that masks its keys puts no weight
there anyway).

Rows are scalar rows of the run store, on the series ``(layer_id=-1, param=<module name>)``
(``<attention module>.head<h>`` per head, ``logits`` for the output), at the step number the
analyzer gives the iteration. Only forward passes in training mode with grad enabled are recorded,
outside ``torch.func`` transforms (``vmap``, ``grad``), and only those of the steps the analyzer
records (``every=``); several forwards in one step
(gradient accumulation) are averaged (maxima: the maximum).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from bbdecoder.attribution.attention_capture import (
    AttentionCaptureError,
    attention_implementations,
    hf_attention_modules,
    mha_attention_weights,
    mha_call,
    mha_modules,
    qkv_blocks,
    recompute_attention,
)
from bbdecoder.hooks import HookManager
from bbdecoder.monitor.transformer_stats import (
    activation_stats,
    attention_entropy,
    attention_mask_of,
    hidden_of,
    kept_positions,
    logits_of,
    padding_keep,
    transformer_blocks,
)
from bbdecoder.store.background import after_held_steps
from bbdecoder.store.vocabulary import MODEL_LAYER_ID, TRANSFORMER_STATS

PROBE_STATS: tuple[str, ...] = TRANSFORMER_STATS
_MAX_STATS = {"act_max_abs", "logit_max"}


class TransformerProbes:
    """Record activation, attention-entropy and logit statistics of ``analyzer.model`` into its store.

    Args:
        analyzer: the :class:`~bbdecoder.monitor.Analyzer` watching the model (its store, step and
            epoch numbers are used; close the probes before the analyzer).
        activations: record ``act_rms``, ``act_max_abs``, ``act_kurtosis`` per block.
        attention: record ``attn_entropy`` per head. Hugging Face models must run eager attention
            (built with ``attn_implementation="eager"``; fused kernels return no weights and the probes
            never switch a training model's kernel); timm-style blocks have the weights recomputed from
            ``qkv``. Raises :class:`~bbdecoder.attribution.attention_capture.AttentionCaptureError`
            when neither applies.
        logits: record ``logit_mean`` and ``logit_max`` of the model's output (a tensor or ``.logits``).
        blocks: the block modules to probe (``None``: found as in :func:`transformer_blocks`).

    Hooks are removed by :meth:`close` (also as a context manager).
    """

    def __init__(
        self,
        analyzer: Any,
        *,
        activations: bool = True,
        attention: bool = True,
        logits: bool = True,
        blocks: list[nn.Module] | None = None,
    ) -> None:
        writer = getattr(analyzer, "writer", None)
        if (
            writer is None
            or not hasattr(analyzer, "current_step")
            or not hasattr(analyzer, "records_current_step")
            or not isinstance(analyzer.model, nn.Module)
        ):
            raise TypeError(
                "TransformerProbes needs a bbdecoder Analyzer (its model, writer, current_step and "
                "records_current_step)"
            )
        self.analyzer = analyzer
        self.model: nn.Module = analyzer.model
        self._writer = writer
        self._hooks = HookManager()
        self._pending: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._label: tuple[int, int] | None = None
        self._mask: torch.Tensor | None = None  # the running call's attention_mask (True = token)
        self.closed = False
        names = {m: n for n, m in self.model.named_modules()}
        if activations:
            chosen = (
                [(names.get(b, type(b).__name__), b) for b in blocks]
                if blocks is not None
                else transformer_blocks(self.model)
            )
            if not chosen:
                raise ValueError(
                    f"found no transformer blocks in {type(self.model).__name__}; pass blocks=[...] "
                    "or activations=False"
                )
            for name, block in chosen:
                self._hooks.forward_hook(block, self._block_hook(name), with_kwargs=True)
        if attention:
            self._hook_attention()
        if logits:
            self._hooks.forward_hook(self.model, self._logit_hook)
        self._hooks.add(self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True))

    def _read_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._mask = attention_mask_of(module, args, kwargs) if self._recording(module) else None

    # -- hooks --------------------------------------------------------------------------------
    def _recording(self, module: nn.Module) -> bool:
        if self.closed or not module.training or not torch.is_grad_enabled():
            return False
        if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
            # inside vmap / grad (per-sample gradients): the tensors are wrappers that must not
            # escape the transform, and these forwards are not the training step's (dynamo cannot
            # trace the check, and compiles no transform here)
            return False
        return bool(self.analyzer.records_current_step)

    def _add(self, param: str, stat: str, value: torch.Tensor) -> None:
        label = (int(self.analyzer.current_step), int(self.analyzer.current_epoch))
        if self._label is not None and label != self._label:
            self.flush()
        self._label = label
        self._pending.setdefault((param, stat), []).append(value.detach().reshape(()))

    def _block_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, _inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
            hidden = hidden_of(output)
            if hidden is None or not self._recording(module):
                return
            given = kwargs.get("src_key_padding_mask", kwargs.get("tgt_key_padding_mask"))
            keep = kept_positions(padding_keep(given) if given is not None else self._mask, hidden.shape)
            if keep is not None and not bool(keep.any()):
                return
            rms, max_abs, kurtosis = activation_stats(hidden, keep)
            self._add(name, "act_rms", rms)
            self._add(name, "act_max_abs", max_abs)
            self._add(name, "act_kurtosis", kurtosis)

        return hook

    def _heads(
        self,
        name: str,
        weights: torch.Tensor,
        query_keep: torch.Tensor | None = None,
        key_keep: torch.Tensor | None = None,
    ) -> None:
        n, _, lq, lk = weights.shape
        if query_keep is None and self._mask is not None and tuple(self._mask.shape) == (n, lq):
            query_keep = self._mask
        if key_keep is None and self._mask is not None and tuple(self._mask.shape) == (n, lk):
            key_keep = self._mask
        for h, value in enumerate(attention_entropy(weights, query_keep, key_keep)):
            self._add(f"{name}.head{h}", "attn_entropy", value)

    def _hook_mha(self, modules: list[tuple[str, nn.MultiheadAttention]]) -> None:
        """torch's nn.MultiheadAttention: weights recomputed from each call's query and key (the call,
        its kernel and its dropout are left as they are)."""

        def make(name: str) -> Callable[..., None]:
            def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
                if not self._recording(m):
                    return
                assert isinstance(m, nn.MultiheadAttention)
                call = mha_call(args, kwargs)
                with torch.no_grad():
                    weights = mha_attention_weights(m, call)
                key_keep = padding_keep(call.get("key_padding_mask"))
                query_keep = key_keep if call.get("query") is call.get("key") else None
                self._heads(name, weights, query_keep, key_keep)

            return hook

        for name, module in modules:
            if module.bias_k is not None or module.add_zero_attn:
                raise AttentionCaptureError(
                    f"attention entropy cannot be recomputed for {name!r} (add_bias_kv / add_zero_attn); "
                    "pass attention=False"
                )
            self._hooks.forward_hook(module, make(name), with_kwargs=True)

    def _hook_attention(self) -> None:
        hf = hf_attention_modules(self.model)
        if hf:
            kinds = attention_implementations(self.model)
            if kinds - {"eager"}:
                raise AttentionCaptureError(
                    "attention entropy needs eager attention weights, but the model runs "
                    f"{sorted(map(str, kinds))}; "
                    "build it with attn_implementation='eager' (or model.set_attn_implementation('eager')), "
                    "or pass attention=False"
                )
            for name, module, index in hf:

                def hook(m: nn.Module, _i: Any, out: Any, name: str = name, index: int = index) -> None:
                    weights = out[index] if isinstance(out, (tuple, list)) and len(out) > index else None
                    if isinstance(weights, torch.Tensor) and weights.dim() == 4 and self._recording(m):
                        self._heads(name, weights)

                self._hooks.forward_hook(module, hook)
            return
        mha = mha_modules(self.model)
        if mha:
            self._hook_mha(mha)
            return
        blocks = qkv_blocks(self.model)
        if not blocks:
            raise AttentionCaptureError(
                f"found no attention weights in {type(self.model).__name__} (no Hugging Face attention "
                "modules, no nn.MultiheadAttention, no timm-style qkv blocks); pass attention=False"
            )
        names = {m: n for n, m in self.model.named_modules()}
        for block in blocks:

            def on_qkv(m: nn.Module, _i: Any, out: torch.Tensor, block: nn.Module = block) -> None:
                if self._recording(block):
                    with torch.no_grad():
                        weights, _ = recompute_attention(block, out)
                    self._heads(names[block], weights)

            qkv = block.qkv
            assert isinstance(qkv, nn.Module)
            self._hooks.forward_hook(qkv, on_qkv)

    def _logit_hook(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        logits = logits_of(output)
        if logits is None or not self._recording(module):
            return
        detached = logits.detach().float()
        self._add("logits", "logit_mean", detached.mean())
        self._add("logits", "logit_max", detached.amax())

    # -- writing ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write the statistics gathered for the current step (done by itself when the step changes)."""
        if not self._pending or self._label is None:
            return
        keys = list(self._pending)
        values = torch.stack(
            [
                torch.stack(self._pending[k]).amax()
                if k[1] in _MAX_STATS
                else torch.stack(self._pending[k]).mean()
                for k in keys
            ]
        ).cpu()  # one device -> host copy per step
        step, epoch = self._label
        rows = [
            (step, epoch, self._writer.series_id(MODEL_LAYER_ID, param), self._writer.stat_id(stat), float(v))
            for (param, stat), v in zip(keys, values.tolist(), strict=True)
        ]
        after_held_steps(self._writer, partial(self._writer.add_scalars, rows))  # after held steps
        self._pending = {}

    def close(self) -> None:
        """Write what is pending and remove every hook (idempotent)."""
        if self.closed:
            return
        try:
            if not getattr(self.analyzer, "closed", False):
                self.flush()
        finally:
            self._hooks.remove_all()
            self._pending = {}
            self.closed = True

    def __enter__(self) -> TransformerProbes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "PROBE_STATS",
    "TransformerProbes",
    "activation_stats",
    "attention_entropy",
    "attention_mask_of",
    "padding_keep",
    "transformer_blocks",
]
