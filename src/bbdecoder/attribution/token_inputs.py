"""Token inputs for layer attribution: dict batches, token-id baselines, next-token targets.

``inputs`` may be a tensor (passed to the model as ``model(inputs)``) or a dict of tensors passed as
keyword arguments (``model(**inputs)``: ``input_ids``, ``attention_mask``, ``token_type_ids``, ...).
Every tensor whose first dimension is the batch size is split and repeated by rows (IG path points,
noisy copies); other values go to the model as they are.

Baselines for token models (``baseline=``):

* ``"pad"``: every position the pad token (``pad_token_id=`` or ``model.config.pad_token_id``);
* ``"mask"``: every position the mask token (``mask_token_id=`` or ``model.config.mask_token_id``;
  BERT's config has none, so pass ``mask_token_id=tokenizer.mask_token_id``);
* ``"zero"`` (also ``"black"``, IG's default): the zero tensor at the layer (zero embeddings);
* an integer tensor of ids, broadcastable to ``input_ids``: the layer's output for those ids, computed
  with the same other keyword arguments (attention mask, token types);
* a floating tensor broadcastable to the layer's output, or a number: that value at the layer.

With a *float* tensor as inputs and ``layer=`` (a conv layer of a CNN, say), baselines other than
``"zero"`` are taken in input space, as Captum's ``LayerIntegratedGradients`` takes them: ``"black"``,
a tensor shaped like the inputs, ... (see :func:`~bbdecoder.attribution.baselines.make_baseline`), and
the layer's baseline is its output for that input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bbdecoder.targets import (
    TargetError,
    TargetLike,
    class_scores,
    logits_entry,
    resolve_classes,
    select_scores,
)

ModelInputs = torch.Tensor | Mapping[str, Any]

ZERO_BASELINES = ("zero", "black")
TOKEN_BASELINES = ("pad", "mask")


class TokenBatch:
    """A batch of model inputs (a tensor or a dict of keyword tensors) that can be split by rows."""

    def __init__(self, inputs: ModelInputs, ids_key: str = "input_ids") -> None:
        if isinstance(inputs, torch.Tensor):
            first: torch.Tensor = inputs
        elif isinstance(inputs, Mapping):
            tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1]
            if not tensors:
                raise TypeError(
                    "a dict of inputs needs at least one tensor with a batch dimension, got keys "
                    f"{', '.join(map(repr, inputs.keys())) or '(none)'}"
                )
            first = inputs[ids_key] if isinstance(inputs.get(ids_key), torch.Tensor) else tensors[0]
        else:
            raise TypeError(
                f"inputs must be a tensor or a dict of tensors (passed as keyword arguments), got "
                f"{type(inputs).__name__}"
            )
        if first.dim() < 1 or first.shape[0] == 0:
            raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {tuple(first.shape)}")
        if not first.dtype.is_floating_point and first.dim() < 2:
            raise ValueError(
                f"token ids must be a batch (N, L), got shape {tuple(first.shape)}; add the batch "
                "dimension with ids.unsqueeze(0)"
            )
        self.inputs = inputs
        self.ids_key = ids_key
        self.n = int(first.shape[0])
        self.device = first.device

    # -- what is in it ----------------------------------------------------------------------------
    @property
    def ids(self) -> torch.Tensor | None:
        """The integer token ids (the tensor itself, or ``inputs[ids_key]``), or ``None``."""
        value = self.inputs if isinstance(self.inputs, torch.Tensor) else self.inputs.get(self.ids_key)
        if isinstance(value, torch.Tensor) and not value.dtype.is_floating_point:
            return value
        return None

    @property
    def attention_mask(self) -> torch.Tensor | None:
        if isinstance(self.inputs, Mapping):
            mask = self.inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == self.n:
                return mask
        return None

    # -- new batches ------------------------------------------------------------------------------
    def rows(self, index: torch.Tensor) -> ModelInputs:
        """The inputs of rows ``index`` (sample indices, repeats allowed), in that order."""
        index = index.to(self.device)
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs[index]
        return {k: self._take(v, index) for k, v in self.inputs.items()}

    def _take(self, value: Any, index: torch.Tensor) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.n:
            return value[index.to(value.device)]
        return value

    def with_ids(self, ids: torch.Tensor) -> ModelInputs:
        """The same inputs with the token ids replaced by ``ids`` (for id baselines)."""
        if isinstance(self.inputs, torch.Tensor):
            return ids
        return {**self.inputs, self.ids_key: ids}

    def mask_padding(self, attribution: torch.Tensor) -> torch.Tensor:
        """``attribution`` with every padding position (``attention_mask == 0``) exactly zero."""
        mask = self.attention_mask
        if mask is None or attribution.dim() < 2 or tuple(attribution.shape[:2]) != tuple(mask.shape):
            return attribution
        keep = (mask != 0).to(attribution.device).view(*mask.shape, *(1,) * (attribution.dim() - 2))
        return torch.where(
            keep, attribution, torch.zeros((), dtype=attribution.dtype, device=attribution.device)
        )

    def positions(self, position: int | torch.Tensor) -> torch.Tensor:
        """Per sample, the sequence position a next-token target reads (N,), long.

        ``-1`` is the last attended token (the last ``attention_mask == 1``, which handles right
        padding), other negative values count back from it; a non-negative value is that index; a
        tensor gives one index per sample.
        """
        if isinstance(position, torch.Tensor):
            if position.shape != (self.n,) or position.dtype.is_floating_point:
                raise ValueError(
                    f"a position tensor needs one integer per sample ({self.n},), got {tuple(position.shape)}"
                )
            return position.to(self.device, torch.long)
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position must be an int, got {type(position).__name__}")
        mask = self.attention_mask
        ids = self.ids
        length = int(ids.shape[1]) if ids is not None else None
        if mask is not None:
            index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = torch.where(mask != 0, index, torch.full_like(index, -1)).max(dim=1).values
        elif length is not None:
            last = torch.full((self.n,), length - 1, dtype=torch.long, device=self.device)
        else:
            last = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
        if position >= 0:
            return torch.full_like(last, position)
        return last + 1 + position


def call_model(model: nn.Module, inputs: ModelInputs) -> Any:
    """``model(**inputs)`` for a dict, ``model(inputs)`` for a tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


class KeywordCall(nn.Module):
    """Calls the wrapped model with a dict as keyword arguments (the model itself is not changed)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: ModelInputs) -> Any:
        return call_model(self.model, inputs)


def config_token_id(model: nn.Module, kind: str, given: int | None) -> int:
    """The pad or mask token id: ``given``, else ``model.config.<kind>_token_id``; else a clear error."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 0:
            raise ValueError(f"{kind}_token_id must be a token id (an int >= 0), got {given!r}")
        return given
    config = getattr(model, "config", None)
    value = getattr(config, f"{kind}_token_id", None)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    hint = "tokenizer.mask_token_id" if kind == "mask" else "tokenizer.pad_token_id"
    raise ValueError(
        f"baseline={kind!r} needs the {kind} token's id, and the model's config has no {kind}_token_id; "
        f"pass {kind}_token_id={hint} to attribute, or use baseline='zero' or a tensor of ids"
    )


def baseline_ids(
    spec: Any, batch: TokenBatch, model: nn.Module, *, pad_token_id: int | None, mask_token_id: int | None
) -> torch.Tensor | None:
    """The baseline's token ids shaped like the inputs' ids, or ``None`` for a layer-space baseline."""
    if isinstance(spec, str):
        if spec in ZERO_BASELINES:
            return None
        if spec not in TOKEN_BASELINES:
            raise ValueError(
                f"unknown token baseline {spec!r}; use 'pad', 'mask', 'zero', a tensor of token ids or a "
                "float tensor shaped like the layer's output"
            )
        ids = _require_ids(batch, spec)
        given = pad_token_id if spec == "pad" else mask_token_id
        return torch.full_like(ids, config_token_id(model, spec, given))
    if isinstance(spec, torch.Tensor) and not spec.dtype.is_floating_point:
        ids = _require_ids(batch, "a tensor of ids")
        try:
            return torch.broadcast_to(spec.to(ids.device, ids.dtype), ids.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"the baseline ids have shape {tuple(spec.shape)}, which does not broadcast to the input "
                f"ids' shape {tuple(ids.shape)}; give (N, L) or (1, L) ids"
            ) from None
    return None


def layer_baseline_value(spec: Any, reference: torch.Tensor) -> torch.Tensor:
    """A layer-space baseline shaped like ``reference`` (the layer's output for the inputs)."""
    if isinstance(spec, str) and spec in ZERO_BASELINES:
        return torch.zeros_like(reference)
    if isinstance(spec, bool):
        raise TypeError("a baseline cannot be a bool")
    if isinstance(spec, (int, float)):
        return torch.full_like(reference, float(spec))
    if isinstance(spec, torch.Tensor):
        try:
            return torch.broadcast_to(spec.detach().to(reference), reference.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"a float baseline at the layer must broadcast to the layer's output "
                f"{tuple(reference.shape)}, got shape {tuple(spec.shape)}; for token ids pass an integer "
                "tensor"
            ) from None
    raise TypeError(
        f"a layer baseline must be 'pad', 'mask', 'zero', a tensor or a number, got {type(spec).__name__}"
    )


def _require_ids(batch: TokenBatch, what: str) -> torch.Tensor:
    ids = batch.ids
    if ids is None:
        raise ValueError(
            f"baseline {what} replaces token ids, but the inputs have no integer {batch.ids_key!r}; use "
            "baseline='zero' or a float tensor at the layer"
        )
    return ids


# -- targets ----------------------------------------------------------------------------------------
def sequence_logits(output: Any, positions: torch.Tensor, sample: torch.Tensor) -> Any:
    """For (rows, L, V) logits (language models), the (rows, V) logits at each row's position."""
    logits = logits_entry(output)
    if logits is None or logits.dim() != 3:
        return output
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, positions.to(logits.device)[sample.to(logits.device)]]


def freeze_token_target(
    output: Any, target: TargetLike, batch: TokenBatch, positions: torch.Tensor
) -> TargetLike:
    """``target`` as one class per sample (N,) read from a clean output; callables kept as they are.

    With (N, L, V) logits a class is a vocabulary id read at ``positions`` (the next token).
    """
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    sample = torch.arange(batch.n, device=positions.device)
    return resolve_classes(sequence_logits(output, positions, sample), target, batch.n)


def row_scores(
    output: Any, target: TargetLike, sample: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One differentiable score per row (rows,); ``sample`` maps rows to samples of the batch."""
    rows = int(sample.shape[0])
    if callable(target) and not isinstance(target, torch.Tensor):
        return select_scores(output, target, rows)
    if not isinstance(target, torch.Tensor):
        raise TargetError("internal: token targets must be frozen to classes first")
    classes = target.to(sample.device)[sample]
    return class_scores(sequence_logits(output, positions, sample), classes)


def token_sum(attribution: torch.Tensor) -> torch.Tensor:
    """One signed score per token: ``(N, L, *rest)`` summed over everything after L, ``(N, L)``."""
    if attribution.dim() < 2:
        raise ValueError(
            f"token scores need an attribution (N, L, ...), got shape {tuple(attribution.shape)}"
        )
    if attribution.dim() == 2:
        return attribution
    return attribution.flatten(2).sum(dim=2)


def explain_continuation(
    explainer: Any, inputs: ModelInputs, continuation: Any, **kwargs: Any
) -> torch.Tensor:
    """Token scores for each generated token of a continuation, teacher-forced: a ``(T, L)`` tensor.

    Args:
        explainer: a gradient explainer on a causal language model (logits ``(N, L, V)``).
        inputs: the prompt, ids ``(1, P)`` or a dict with ``input_ids`` ``(1, P)`` (an
            ``attention_mask`` is extended with ones, ``token_type_ids`` with their last value).
        continuation: the ``T`` token ids that follow the prompt, ``(T,)`` or ``(1, T)``.
        kwargs: passed to ``explainer.token_scores`` (``baseline``, ``n_steps``, ...).

    Returns:
        ``(T, L)`` with ``L = P + T - 1``, the tokens the model reads (prompt plus continuation but its
        last token). Row ``k`` explains the logit of ``continuation[k]`` at position ``P + k - 1``; the
        columns after that position are zero for a causal model. The ``T`` targets run as one batch of
        ``T`` copies of the sequence (each row is independent, so this equals one call per token).
    """
    batch = TokenBatch(inputs)
    prompt = batch.ids
    if prompt is None or batch.n != 1:
        raise ValueError(
            "explain_continuation needs one prompt of token ids (1, P) (or a dict with input_ids)"
        )
    tokens = torch.as_tensor(continuation, device=prompt.device)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.dtype.is_floating_point:
        raise ValueError(f"continuation must be token ids (T,) with T >= 1, got shape {tuple(tokens.shape)}")
    t = int(tokens.numel())
    p = int(prompt.shape[1])
    fed = tokens[:-1].to(prompt.dtype)[None]
    if isinstance(inputs, torch.Tensor):
        full: ModelInputs = torch.cat([prompt, fed], dim=1)
    else:
        extended: dict[str, Any] = {}
        for key, value in inputs.items():
            if key == batch.ids_key:
                extended[key] = torch.cat([prompt, fed], dim=1)
            elif key == "attention_mask" and isinstance(value, torch.Tensor):
                extended[key] = torch.cat([value, value.new_ones(1, t - 1)], dim=1)
            elif key == "token_type_ids" and isinstance(value, torch.Tensor):
                extended[key] = torch.cat([value, value[:, -1:].expand(1, t - 1)], dim=1)
            elif isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (1, p):
                raise ValueError(
                    f"explain_continuation cannot extend the per-token input {key!r}; pass input_ids, "
                    "attention_mask and token_type_ids only"
                )
            else:
                extended[key] = value
        full = extended
    rows = TokenBatch(full).rows(torch.zeros(t, dtype=torch.long))
    positions = torch.arange(p - 1, p - 1 + t, device=prompt.device)
    scores: torch.Tensor = explainer.token_scores(rows, tokens.long(), position=positions, **kwargs)
    return scores
