"""Per-sample statistics and the gradient noise scale as run-store rows, for ``Analyzer(per_sample=)``.

Stored every ``k`` recorded steps (``per_sample=k``; ``True`` means every step), in the step's
``scalars`` rows:

- per parameter tensor: ``sample_norm_mean``, ``sample_var``, ``sample_grad_sq`` (definitions in
  :mod:`bbdecoder.monitor.per_sample`);
- for the whole model (``layer_id`` -1, ``param`` ``"*"``): the same three over all covered
  tensors together, ``batch_size`` (B), ``noise_trace`` and ``noise_grad_sq`` (the unbiased
  ``tr(Sigma)`` and ``|G|^2`` of :func:`bbdecoder.monitor.noise_scale.from_samples`),
  ``noise_scale`` (``B_simple`` of this step) and ``noise_scale_ema`` (smoothed over the per-sample
  steps, :class:`~bbdecoder.monitor.noise_scale.NoiseScaleEMA`).

Under ``torch.distributed`` (``DistributedAnalyzer``, DDP or FSDP2) ``B`` is the global batch (every
rank's samples) and the statistics are merged exactly across ranks on the per-sample steps
(:mod:`bbdecoder.monitor.per_sample_merge`). With ``tensorboard=`` the same values are logged live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.monitor.noise_scale import NoiseScaleEMA, from_samples
from bbdecoder.monitor.per_sample import PerSampleGradients, PerSampleStats

PER_SAMPLE_STATS: tuple[str, ...] = ("sample_norm_mean", "sample_var", "sample_grad_sq")
"""Per parameter tensor (and for the whole model): mean_i ||g_i||, (1/B) sum_i ||g_i - G||^2, ||G||^2."""

NOISE_STATS: tuple[str, ...] = (
    "batch_size",
    "noise_trace",
    "noise_grad_sq",
    "noise_scale",
    "noise_scale_ema",
)
"""Whole model only (layer_id -1, param "*"): B, unbiased tr(Sigma) and |G|^2, B_simple, smoothed."""

MODEL_LAYER_ID = -1
MODEL_PARAM = "*"


def per_sample_every(per_sample: bool | int | None) -> int:
    """``per_sample`` as a period in steps (0: off). ``True``: 1; ``k >= 1``: every ``k`` steps."""
    if per_sample is None or per_sample is False:
        return 0
    if per_sample is True:
        return 1
    if isinstance(per_sample, int) and per_sample >= 1:
        return per_sample
    raise ValueError(f"per_sample must be True, False or a period k >= 1, got {per_sample!r}")


class PerSampleRecorder:
    """Arms :class:`PerSampleGradients` for the steps it records and turns them into store rows.

    Args:
        every: record every this many steps (``>= 1``).
        model: the model.
        params: ``(state_dict name, parameter, series_id)`` of the tracked tensors.
        writer: the run writer (``stat_id``/``series_id``).
        first_step: the number of the next step the Analyzer records.
        hooks, pause: as for :class:`PerSampleGradients`.
        loss_reduction: ``"mean"`` or ``"sum"``.
        ema: decay of :class:`NoiseScaleEMA`.
    """

    def __init__(
        self,
        every: int,
        model: nn.Module,
        params: Sequence[tuple[str, torch.Tensor, int]],
        writer: Any,
        first_step: int,
        *,
        hooks: HookManager | None = None,
        pause: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        loss_reduction: str = "mean",
        ema: float = 0.9,
        sync: Any = None,
        tensorboard: Any = None,
    ) -> None:
        self.every = every
        self.sync = sync
        self.tensorboard = tensorboard
        self.grads = PerSampleGradients(
            model, [(n, p) for n, p, _ in params], loss_reduction=loss_reduction, hooks=hooks, pause=pause
        )
        self._series = {n: sid for n, _, sid in params}
        self._model_series = writer.series_id(MODEL_LAYER_ID, MODEL_PARAM)
        self._stat = {s: writer.stat_id(s) for s in PER_SAMPLE_STATS + NOISE_STATS}
        self.ema = NoiseScaleEMA(ema)
        self.last: PerSampleStats | None = None
        self.arm_for(first_step)

    def arm_for(self, step: int) -> None:
        """Capture the forward/backward passes of ``step`` when it is a per-sample step."""
        self.grads.arm(step % self.every == 0)

    def rows(self, step: int, epoch: int) -> list[tuple[int, int, int, int, float]]:
        """This step's rows (``[]`` when it is not a per-sample step); arms for ``step + 1``."""
        if not self.grads.armed:
            self.arm_for(step + 1)
            return []
        try:
            stats = self.grads.compute()
            if self.sync is not None and getattr(self.sync, "world_size", 1) > 1:
                from bbdecoder.monitor.per_sample_merge import merge_across_ranks

                stats = merge_across_ranks(
                    stats, self.sync.group, nccl=bool(getattr(self.sync, "_nccl", False))
                )
        finally:
            self.arm_for(step + 1)
        self.last = stats
        table = torch.cat([stats.table, stats.model_row().unsqueeze(0)]).cpu().tolist()
        out = []
        for name, values in zip([*stats.names, None], table, strict=True):
            sid = self._model_series if name is None else self._series[name]
            out += [
                (step, epoch, sid, self._stat[s], float(v))
                for s, v in zip(PER_SAMPLE_STATS, values, strict=True)
            ]
        batch = stats.batch_size
        _, model_var, model_grad_sq = table[-1]
        estimate = from_samples(model_var, model_grad_sq, batch) if batch > 1 else None
        extra = {"batch_size": float(batch)}
        if estimate is not None:
            extra |= {
                "noise_trace": estimate.trace,
                "noise_grad_sq": estimate.grad_sq,
                "noise_scale": estimate.noise_scale,
                "noise_scale_ema": self.ema.update(estimate),
            }
        out += [(step, epoch, self._model_series, self._stat[s], float(v)) for s, v in extra.items()]
        if self.tensorboard is not None:
            from bbdecoder.monitor.tensorboard import per_sample_scalars

            self.tensorboard.record_scalars(step, per_sample_scalars(stats.names, table, extra))
        return out

    def close(self) -> None:
        self.grads.close()


def per_sample_recorder(
    per_sample: bool | int | None,
    model: nn.Module,
    params: Sequence[Any],
    writer: Any,
    first_step: int,
    *,
    hooks: HookManager | None = None,
    pause: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    sync: Any = None,
    **kwargs: Any,
) -> PerSampleRecorder | None:
    """The Analyzer's hook-up: a :class:`PerSampleRecorder` for ``per_sample`` (``None`` when off).
    ``params`` are objects with ``name``, ``tensor`` and ``series_id`` (the Analyzer's tracked
    tensors). With a rank ``sync`` (DDP, FSDP2) the statistics are those of the global batch, merged
    exactly across ranks (:mod:`bbdecoder.monitor.per_sample_merge`)."""
    every = per_sample_every(per_sample)
    if not every:
        return None
    if sync is not None and not hasattr(sync, "group"):
        raise TypeError(
            f"per_sample needs a RankSync-like sync (with .group and .world_size), got {type(sync).__name__}"
        )
    triples = [(p.name, p.tensor, p.series_id) for p in params if p.tensor.requires_grad]
    return PerSampleRecorder(
        every, model, triples, writer, first_step, hooks=hooks, pause=pause, sync=sync, **kwargs
    )


__all__ = ["NOISE_STATS", "PER_SAMPLE_STATS", "PerSampleRecorder", "per_sample_every", "per_sample_recorder"]
