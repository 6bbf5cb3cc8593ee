"""Ablation-CAM (Desai & Ramaswamy 2020): channel weights from the score drop when a channel is zeroed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bbdecoder.attribution.base import InputTransform
from bbdecoder.attribution.cam.base import BaseCAM, CAMContext, check_batch_size
from bbdecoder.attribution.cam.reshape import ReshapeLike
from bbdecoder.backends.layers_base import Replacement
from bbdecoder.layers import LayerSelection


class AblationCAM(BaseCAM):
    """Ablation-CAM: ``w_c = (y - y_c) / y`` with ``y`` the target score and ``y_c`` the score when
    channel c of the layer's output is set to ``ablation_value`` (0, as in the paper); map
    ``ReLU(sum_c w_c A_c)``.

    The channel is replaced by the layer backend (PyTorch: a forward hook that returns the ablated
    output; Keras: the layer's call intercepted; the model is never modified). One row per sample and
    channel, ``batch_size`` rows per forward pass; a chunk's rows are one sample's, so the layers below
    the ablated one run once per chunk on that sample and the replacement is the chunk's ablated
    outputs (checked once per call against the one-row-per-input way on two channels, which is used
    instead where they differ: a model that reuses an input-sized tensor after the layer).
    pytorch-grad-cam 1.5.7 ablates with 0 when the layer's minimum is 0 and with ``min - 1e7``
    otherwise; both agree on ReLU outputs. With a custom ``reshape`` callable, it must only move
    elements (permute, reshape, slice) so that each channel's positions in the raw output are known.
    ``progress``: a progress bar (``None``: when stderr is a TTY). Otherwise as :class:`~bbdecoder.GradCAM`.
    """

    method_name = "Ablation-CAM"
    uses_gradients = False

    def __init__(
        self,
        model: Any,
        layer: LayerSelection = None,
        reshape: ReshapeLike = None,
        *,
        batch_size: int = 32,
        ablation_value: float = 0.0,
        progress: bool | None = None,
        target_layers: LayerSelection = None,
        reshape_transform: ReshapeLike = None,
        input_transform: InputTransform | None = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(
            model,
            layer,
            reshape,
            target_layers=target_layers,
            reshape_transform=reshape_transform,
            input_transform=input_transform,
            eval_mode=eval_mode,
        )
        self.batch_size = check_batch_size(batch_size)
        self.ablation_value = float(ablation_value)
        self.progress = progress

    def _channel_positions(self, ctx: CAMContext) -> torch.Tensor:
        """``(C, positions)``: each channel's flat indices in one sample's raw layer output."""
        raw = ctx.record.raw
        per_sample = raw[0].numel()
        index = torch.arange(per_sample, dtype=torch.float64, device=raw.device).view(1, *raw.shape[1:])
        moved = self.to_channel_first(ctx.record.name, index, ctx.inputs[:1])
        if not torch.equal(moved, moved.round()):
            raise ValueError(
                "AblationCAM needs a reshape that only moves elements (permute, reshape, slice); this one "
                "computes new values, so a channel cannot be ablated in the layer's output"
            )
        return moved[0].flatten(1).long()

    def cam_weights(
        self, ctx: CAMContext, activations: torch.Tensor, gradients: torch.Tensor | None
    ) -> torch.Tensor:
        inputs = ctx.inputs.detach()
        record = ctx.record
        n, c = activations.shape[:2]
        positions = self._channel_positions(ctx)
        target = ctx.target
        backend = self.layer_backend
        with backend.progress_session():
            original = backend.row_scores(inputs, torch.arange(n, device=inputs.device), target)
        current: dict[str, torch.Tensor] = {}

        def make_batch(start: int, stop: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
            rows = torch.arange(start, stop, device=inputs.device)
            samples = rows // c
            ablated = record.raw[samples.to(record.raw.device)].clone(memory_format=torch.contiguous_format)
            flat = ablated.view(stop - start, -1)
            cols = positions[(rows % c).to(positions.device)]
            flat.scatter_(1, cols, self.ablation_value)
            current["output"] = ablated
            if shared:  # every row of the chunk is the same sample: run the layers below once
                return inputs[start // c : start // c + 1], samples
            return inputs[samples], samples

        def replace(_start: int, _stop: int) -> Replacement:
            return Replacement(record.module, record.calls, current["output"])

        def scores_of(bounds: list[tuple[int, int]], shared: bool) -> torch.Tensor:
            return self.row_scores(
                n * c,
                lambda start, stop: make_batch(start, stop, shared),
                target,
                self.batch_size,
                self.progress if len(bounds) > 1 else False,
                replace=replace,
                bounds=bounds,
            )

        # Chunks never straddle two samples, so each chunk's rows share one input.
        bounds = [
            (start, min(start + self.batch_size, (start // c + 1) * c))
            for sample in range(n)
            for start in range(sample * c, (sample + 1) * c, self.batch_size)
        ]
        shared = self._shared_trunk_is_exact(lambda b, flag: scores_of(b, flag), c)
        scores = scores_of(bounds, shared).view(n, c)
        denominator = torch.where(original == 0, torch.ones_like(original), original).unsqueeze(1)
        return ((original.unsqueeze(1) - scores) / denominator).to(activations.dtype)

    @staticmethod
    def _shared_trunk_is_exact(
        scores_of: Callable[[list[tuple[int, int]], bool], torch.Tensor], channels: int
    ) -> bool:
        """Whether a chunk can run the layers below the ablated one on its sample once (one input row,
        the hook returning the chunk's rows), instead of once per row as every row is the same input.

        That holds when nothing after the layer uses a tensor computed from the input with the input's
        batch size (a skip connection around the layer would fail to broadcast, a ``view(N, -1)``
        would fail). Checked once per call on the first two ablated channels: both ways must give the
        same scores, else every chunk runs the full batch.
        """
        probe = [(0, min(2, channels))]
        try:
            shared = scores_of(probe, True)
        except (RuntimeError, ValueError, TypeError, IndexError):
            return False
        full = scores_of(probe, False)
        if shared.shape != full.shape:
            return False
        scale = float(full.abs().max()) if full.numel() else 0.0
        return bool(torch.allclose(shared, full, rtol=1e-4, atol=1e-5 * max(scale, 1e-12)))
