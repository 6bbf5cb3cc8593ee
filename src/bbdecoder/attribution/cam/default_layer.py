"""The default CAM layer: the trunk's last feature map, never a residual branch or a pass-through."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager

if TYPE_CHECKING:
    from bbdecoder.attribution.cam.base import BaseCAM

# A channel-first map's spatial dims shrink by similar strides; a channels-last (N, H, W, C) read
# as (N, C, H', W') gives "strides" that differ wildly (224/7 against 224/768).
_MAX_STRIDE_RATIO = 2.0


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
    events: list[tuple[str, nn.Module, torch.Tensor, int, bool]] = []
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
                events.append((name, module, output, output._version, passthrough))

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
    chosen = next(
        (
            (name, module, output, version)
            for name, module, output, version, _ in reversed(events)
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
    for ev_name, ev_module, ev_output, ev_version, passthrough in events:
        if ev_output is output and ev_version == version and not passthrough:
            return [(ev_name, ev_module)]
    return [(name, module)]
