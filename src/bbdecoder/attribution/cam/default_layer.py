"""The default CAM layer: the trunk's last feature map, never a residual branch or a pass-through."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bbdecoder.attribution.cam.reshape import Tokens, resolve_reshape, tokens
from bbdecoder.hooks import HookManager

if TYPE_CHECKING:
    from bbdecoder.attribution.cam.base import BaseCAM

# A channel-first map's spatial dims shrink by similar strides; a channels-last (N, H, W, C) read
# as (N, C, H', W') gives "strides" that differ wildly (224/7 against 224/768).
_MAX_STRIDE_RATIO = 2.0

# (name, module, output, output version, is a pass-through, the (tensor, version) inputs it saw)
BLOCK_LISTS = (nn.ModuleList, nn.Sequential)
Event = tuple[str, nn.Module, torch.Tensor, int, bool, list[tuple[torch.Tensor, int]]]


def _spatial(cam: BaseCAM, name: str, output: torch.Tensor, inputs: torch.Tensor) -> bool:
    try:
        tensor = cam.to_channel_first(name, output, inputs[:1])
    except (ValueError, TypeError):
        return False
    return tensor.shape[2:].numel() > 1


def _plausible(shape: tuple[int, ...], input_spatial: tuple[int, ...]) -> bool:
    strides = [i / o for i, o in zip(input_spatial, shape[2:], strict=True)]
    if min(strides) < 1:
        return False
    return max(strides) / min(strides) <= _MAX_STRIDE_RATIO


def find_default_layer(cam: BaseCAM, hooks: HookManager, inputs: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """See :meth:`BaseCAM.default_layers`; runs one probe forward inside the caller's session."""
    events: list[Event] = []
    pending: dict[int, list[list[tuple[torch.Tensor, int]]]] = {}

    def pre_hook(module: nn.Module, args: Any) -> None:
        seen = [(a, a._version) for a in args if isinstance(a, torch.Tensor)]
        pending.setdefault(id(module), []).append(seen)

    def make_hook(name: str) -> Any:
        def record(module: nn.Module, _args: Any, output: Any) -> None:
            stack = pending.get(id(module))
            seen = stack.pop() if stack else []
            if isinstance(output, torch.Tensor):
                # nn.Identity (timm's `aa`), eval Dropout: the input itself, unchanged.
                passthrough = any(output is a and output._version == v for a, v in seen)
                events.append((name, module, output, output._version, passthrough, seen))

        return record

    for name, module in cam.model.named_modules():
        if module is cam.model:
            continue
        hooks.forward_pre_hook(module, pre_hook)
        hooks.forward_hook(module, make_hook(name))
    try:
        cam.forward(inputs[:1])
    except Exception as err:
        if inputs.dim() == 3 and hasattr(err, "add_note"):
            err.add_note(
                "bbdecoder: the inputs have 3 dims; if this is one image (C, H, W), add the batch "
                "dimension with x.unsqueeze(0)"
            )
        raise
    if cam.reshape is None or isinstance(cam.reshape, Tokens):
        token_layer = _token_block(cam, events, inputs)
        if token_layer is not None:
            return [token_layer]
    chosen = next(
        (
            (name, module, output, version)
            for name, module, output, version, _, _ in reversed(events)
            if _spatial(cam, name, output, inputs)
        ),
        None,
    )
    if chosen is None:
        raise ValueError(
            f"found no layer with a spatial output for {cam.method_name} (no module outputs a map with "
            f"the input's {inputs.dim()} dims and more than one position); pass `layer=` (a module, "
            "name or ID), and `reshape=` if its output is channels-last or a token sequence"
        )
    name, module, output, version = chosen
    if cam.reshape is None and not _plausible(tuple(output.shape), tuple(inputs.shape[2:])):
        raise ValueError(
            f"the last module with a spatial output, {name!r}, outputs shape {tuple(output.shape)}, which "
            f"does not look like a channel-first feature map (N, C, *spatial) of inputs shaped "
            f"{tuple(inputs[:1].shape)}; if it is channels-last pass reshape='channels_last', "
            "or choose `layer=`"
        )
    # The same tensor leaves a block's last activation, the block, its stage: name the innermost.
    for ev_name, ev_module, ev_output, ev_version, passthrough, _ in events:
        if ev_output is output and ev_version == version and not passthrough:
            return [(ev_name, ev_module)]
    return [(name, module)]


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, norms) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _token_block(cam: BaseCAM, events: list[Event], inputs: torch.Tensor) -> tuple[str, nn.Module] | None:
    """A vision transformer's default: the input of the last block's first norm.

    That is the previous block's output (the token sequence before the last attention mixes the
    patches into the class token); the last block's output itself, the final norm's input, gets a
    zero gradient at every patch token. Where no module outputs that input (a one-block model whose
    token sequence is concatenated in the forward), the first norm's output.

    Applies when the model declares a patch size (timm's ``patch_embed.patch_size``, a Hugging Face
    ``config.patch_size``) and some module outputs a token sequence ``(1, prefix + h * w, C)`` on the
    input's patch grid. The prefix (class, distillation, register tokens) is inferred as
    ``tokens - h * w``, and ``cam.reshape`` set to ``tokens(prefix)`` unless the user gave one.
    """
    from bbdecoder.attribution.rollout import _patch_size

    patch = _patch_size(cam.model)
    if patch is None or inputs.dim() != 4:
        return None
    h, w = inputs.shape[2] // patch[0], inputs.shape[3] // patch[1]
    if h * w <= 1:
        return None

    def prefix_of(tensor: torch.Tensor) -> int | None:
        if tensor.dim() != 3 or tensor.shape[0] != 1:
            return None
        prefix = tensor.shape[1] - h * w
        return prefix if 0 <= prefix < h * w else None

    last = next((ev for ev in reversed(events) if prefix_of(ev[2]) is not None), None)
    if last is None:
        return None
    output, version = last[2], last[3]
    if _is_norm(last[1]):
        # The final norm's input is the last block's output (pytorch-grad-cam's advice for ViT).
        seen = [(a, v) for a, v in last[5] if prefix_of(a) is not None]
        if not seen:
            return None
        output, version = seen[0]
    modules = dict(cam.model.named_modules())

    def producer(tensor: torch.Tensor, version: int) -> tuple[str, nn.Module] | None:
        found = [ev for ev in events if ev[2] is tensor and ev[3] == version and not ev[4]]
        in_list = [ev for ev in found if isinstance(modules.get(ev[0].rpartition(".")[0]), BLOCK_LISTS)]
        best = in_list or found
        return (best[0][0], best[0][1]) if best else None

    block = producer(output, version)
    if block is None:
        return None
    # Only the class token of the last block's output reaches the head (the final norm is per token),
    # so the patch tokens' gradient there is zero and Grad-CAM empty: take the input of the last
    # block's first norm instead, the previous block's output (pytorch-grad-cam's blocks[-1].norm1).
    first_norm = next((ev for ev in events if ev[0].startswith(block[0] + ".") and _is_norm(ev[1])), None)
    if first_norm is not None:
        before = [(a, v) for a, v in first_norm[5] if prefix_of(a) is not None]
        earlier = producer(*before[0]) if before else None
        if earlier is not None:
            block = earlier
            output = before[0][0]
        elif prefix_of(first_norm[2]) is not None:
            # No module outputs that sequence (built by torch.cat in the forward): the norm's output.
            block = (first_norm[0], first_norm[1])
            output = first_norm[2]
    name, module = block
    if cam.reshape is None:
        prefix = prefix_of(output)
        assert prefix is not None
        cam.reshape = tokens(prefix=prefix)
        cam._reshape = resolve_reshape(cam.reshape)
    return name, module
