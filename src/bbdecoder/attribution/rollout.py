"""Attention rollout (Abnar & Zuidema 2020) and gradient-weighted rollout (Chefer et al. 2021)
for vision transformers: the class token's row over the patch tokens, as a grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.attribution.attention_capture import capture_attention, qkv_blocks
from bbdecoder.attribution.base import Explainer, InputTransform, check_inputs
from bbdecoder.targets import TargetLike, select_scores

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """(N, H, T, T) -> (N, T, T) by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` fraction of lowest entries of every row of (N, T, T), never column 0 (the
    class token). vit-explain ranks the whole flattened matrix instead and keeps only entry (0, 0)."""
    if ratio <= 0:
        return attention
    t = attention.shape[-1]
    k = int((t - 1) * ratio)
    if k == 0:
        return attention
    rest = attention[..., 1:]
    lowest = rest.topk(k, dim=-1, largest=False).indices
    rest = rest.scatter(-1, lowest, 0.0)
    return torch.cat([attention[..., :1], rest], dim=-1)


def rollout(
    attentions: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Abnar & Zuidema's rollout ``R = A_hat_L ... A_hat_1`` with ``A_hat = 0.5 A + 0.5 I``, rows
    renormalised to sum 1; ``A`` is each layer's (N, H, T, T) map fused over heads. Returns (N, T, T)."""
    if not attentions:
        raise ValueError("no attention maps to roll out")
    n, _, t, _ = attentions[0].shape
    eye = torch.eye(t, dtype=torch.float64, device=attentions[0].device)
    result = eye.expand(n, t, t)
    for attention in attentions:
        fused = discard_lowest(fuse_heads(attention.double(), head_fusion), discard_ratio)
        a_hat = 0.5 * fused + 0.5 * eye
        a_hat = a_hat / a_hat.sum(dim=-1, keepdim=True)
        result = a_hat @ result
    return result.float()


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Chefer, Gur & Wolf (ICCV 2021, "Generic Attention-model Explainability ..."), eqs. 5-6 for
    self-attention: ``A_bar = E_h[(grad_A * A)^+]``, ``R = I``, then ``R <- R + A_bar R`` per layer,
    first to last (no renormalisation). Returns (N, T, T)."""
    if not attentions:
        raise ValueError("no attention maps to roll out")
    n, _, t, _ = attentions[0].shape
    result = torch.eye(t, dtype=torch.float64, device=attentions[0].device).expand(n, t, t)
    for attention, grad in zip(attentions, gradients, strict=True):
        a_bar = torch.relu(grad.double() * attention.double()).mean(dim=1)
        result = result + a_bar @ result
    return result.float()


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    candidates: list[Any] = []
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        candidates.append(getattr(embed, "patch_size", None))
    candidates += [getattr(getattr(m, "config", None), "patch_size", None) for m in model.modules()]
    for size in candidates:
        if isinstance(size, int) and size > 0:
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return int(size[0]), int(size[1])
    return None


def token_layout(
    model: nn.Module,
    num_tokens: int,
    image_hw: tuple[int, int],
    prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> tuple[int, int, int]:
    """``(prefix, h, w)``: the number of prefix tokens (class, distillation, registers) and the patch grid.

    With a known patch size (timm's ``patch_embed.patch_size``, a Hugging Face ``config.patch_size``)
    the grid is ``(H // p, W // p)`` and the prefix the remaining tokens; otherwise the prefix is
    ``prefix_tokens``, timm's ``num_prefix_tokens`` or 1, and the grid square (or of the image's aspect).
    """
    height, width = image_hw
    if grid is None and prefix_tokens is None:
        patch = _patch_size(model)
        if patch is not None:
            h, w = height // patch[0], width // patch[1]
            if 0 < h * w < num_tokens:
                return num_tokens - h * w, h, w
    if prefix_tokens is None:
        known = getattr(model, "num_prefix_tokens", None)
        prefix_tokens = int(known) if isinstance(known, int) else 1
    patches = num_tokens - prefix_tokens
    if grid is not None:
        h, w = grid
    else:
        h = round(math.sqrt(patches * height / width)) if patches > 0 else 0
        w = patches // h if h else 0
    if prefix_tokens < 1 or h * w != patches or patches <= 0:
        raise ValueError(
            f"cannot lay {num_tokens} tokens out as {prefix_tokens} prefix token(s) plus a patch grid for a "
            f"{height}x{width} input; pass prefix_tokens= (class + distillation + register tokens, >= 1) "
            "and/or grid=(h, w)"
        )
    return prefix_tokens, h, w


def _logits(output: Any) -> Any:
    if not isinstance(output, torch.Tensor) and isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    return output


class _Rollout(Explainer):
    def __init__(
        self,
        model: nn.Module,
        *,
        prefix_tokens: int | None = None,
        grid: tuple[int, int] | None = None,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(model, input_transform=input_transform, eval_mode=eval_mode)
        self.prefix_tokens = prefix_tokens
        self.grid = grid

    def _matrix(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        raise NotImplementedError

    def _capture(
        self, x: torch.Tensor, target: TargetLike, need_grad: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The attention maps of one forward pass and (``need_grad``) d target / d map, both (N, H, T, T)."""
        with self.session() as hooks, capture_attention(self.model, hooks) as captured:
            with torch.set_grad_enabled(need_grad):
                output = self.forward(x)
            if not captured.weights:
                raise RuntimeError(
                    f"no attention module of {type(self.model).__name__} ran in the forward pass"
                )
            grads: list[torch.Tensor] = []
            if need_grad or target is not None:  # a target the map ignores is still checked
                scores = select_scores(output if callable(target) else _logits(output), target, x.shape[0])
            if need_grad:
                grads = captured.gradients(scores.sum())
        return captured.weights, grads

    def attribute(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """The class token's row of the rolled-out matrix over the patch tokens, (N, 1, h, w)."""
        x = check_inputs(inputs, min_dim=4)
        matrix = self._matrix(x, target)
        prefix, h, w = token_layout(
            self.model, matrix.shape[-1], (x.shape[-2], x.shape[-1]), self.prefix_tokens, self.grid
        )
        return matrix[:, 0, prefix:].reshape(x.shape[0], 1, h, w).detach()

    def saliency(self, inputs: torch.Tensor, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """:meth:`attribute` upsampled bilinearly (``align_corners=False``) to the input, (N, 1, H, W)."""
        grid = self.attribute(inputs, target)
        return F.interpolate(grid, size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)


class AttentionRollout(_Rollout):
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    Per layer the attention ``(N, heads, T, T)`` is fused over heads (``head_fusion``: ``"mean"``,
    ``"max"``, ``"min"``), optionally thinned (``discard_ratio``: in every row that fraction of the
    lowest entries is set to 0, the class-token column always kept), the residual added as
    ``0.5 A + 0.5 I`` and the rows renormalised; the layers are multiplied first to last. ``target``
    does not change the map (rollout does not depend on the class); a given one is still checked
    (a class out of range raises :class:`~bbdecoder.TargetError`).

    Attention weights: Hugging Face models run with eager attention for the call (restored after),
    torch's ``nn.MultiheadAttention`` (``nn.TransformerEncoder``) has them recomputed from each call's
    query, key and masks (the call itself unchanged; torch's MHA fast path off for the call), and
    timm-style blocks (``qkv`` Linear + ``num_heads``) from ``qkv``; other models get an
    :class:`~bbdecoder.attribution.attention_capture.AttentionCaptureError`.

    Args:
        model: the vision transformer (never modified); inputs ``(N, C, H, W)``.
        prefix_tokens: overrides the inferred number of prefix tokens (class, distillation,
            registers).
        grid: overrides the inferred ``(h, w)`` patch grid.
    """

    def __init__(
        self,
        model: nn.Module,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        *,
        prefix_tokens: int | None = None,
        grid: tuple[int, int] | None = None,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
    ) -> None:
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        super().__init__(
            model,
            prefix_tokens=prefix_tokens,
            grid=grid,
            input_transform=input_transform,
            eval_mode=eval_mode,
        )
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio

    def _matrix(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        weights, _ = self._capture(x, target, need_grad=False)
        return rollout(weights, self.head_fusion, self.discard_ratio)


class GradientRollout(_Rollout):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, ICCV 2021, "Generic Attention-model
    Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", eqs. 5-6, the
    self-attention rule): per layer ``A_bar = mean_h(relu(dS/dA_h * A_h))`` with ``S`` the target
    logit, ``R = I`` and ``R <- R + A_bar R`` first to last layer. ``target`` as for every explainer
    (``None``: the arg-max class).

    Attention weights as for :class:`AttentionRollout`; for timm-style blocks ``dS/dA`` is computed
    from the gradient of the ``proj`` input (``O = A V``), so fused kernels are fine.
    """

    def _matrix(self, x: torch.Tensor, target: TargetLike) -> torch.Tensor:
        weights, grads = self._capture(x, target, need_grad=True)
        return gradient_rollout(weights, grads)


__all__ = [
    "AttentionRollout",
    "GradientRollout",
    "discard_lowest",
    "fuse_heads",
    "gradient_rollout",
    "qkv_blocks",
    "rollout",
    "token_layout",
]
