"""A PyTorch Lightning callback that runs the training monitor inside ``Trainer.fit``.

Needs ``lightning`` (or the older ``pytorch_lightning``); importing :mod:`bbdecoder` or
:mod:`bbdecoder.integrations` never imports it, only this module does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bbdecoder.integrations.sharded import rank_sync_for
from bbdecoder.layers import LayerSelection
from bbdecoder.monitor.analyzer import Analyzer, EmptyEpochError

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on which Lightning package is installed
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]
    except ImportError as error:
        raise ImportError(
            "bbdecoder.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from error


class BBDecoderCallback(Callback):
    """Record the :class:`~bbdecoder.monitor.Analyzer` statistics of the ``LightningModule`` during fit.

    - The analyzer is built in ``on_fit_start`` on the LightningModule itself (after
      ``configure_model`` and the strategy's set-up), so layer and parameter names are those of
      ``pl_module.state_dict()`` (e.g. ``net.0.weight``).
    - Each optimizer step is recorded in ``on_before_optimizer_step``: after the backward passes of
      all accumulated micro-batches and after AMP unscaling, **before** gradient clipping, so the
      stored norms are those the clipping saw. The step's loss is the mean of its micro-batch losses.
    - ``on_train_epoch_end`` closes the epoch (numbered ``trainer.current_epoch``): per-epoch
      aggregates, weight histograms and activation statistics.
    - The analyzer is closed (hooks removed, store flushed) when fit ends or raises; the module is
      left exactly as it was.
    - Multi-process strategies (DDP): statistics are reduced across ranks once per step and only
      global rank 0 writes the store (see :mod:`bbdecoder.integrations.ddp`).
    - FSDP2 through ``ModelParallelStrategy`` (``fully_shard`` applied in ``configure_model``): the
      statistics of the full, unsharded tensors (:mod:`bbdecoder.integrations.sharded`). Lightning's
      ``FSDPStrategy`` (FSDP1, flat parameters) is refused in ``setup`` with the reason; use
      ``ModelParallelStrategy`` and ``fully_shard`` instead.

    Args:
        save_path: folder of the run store.
        layers: layers whose parameters are tracked (IDs, names, globs, types; ``None``: all).
        weights, activations, flush_every, ...: passed to :class:`~bbdecoder.monitor.Analyzer`.
    """

    def __init__(
        self,
        save_path: str | Path = "bbdecoder_run",
        layers: LayerSelection = None,
        *,
        weights: bool = True,
        activations: LayerSelection | bool = False,
        **analyzer_kwargs: Any,
    ) -> None:
        super().__init__()
        for reserved in ("scaler", "sync"):
            if reserved in analyzer_kwargs:
                raise TypeError(f"BBDecoderCallback sets {reserved}= itself from the Trainer; do not pass it")
        self.save_path = Path(save_path)
        self.layers = layers
        self.weights = weights
        self.activations = activations
        self.analyzer_kwargs = analyzer_kwargs
        self.analyzer: Analyzer | None = None
        self._loss: torch.Tensor | None = None

    # -- lifetime -----------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._close()
        refuse_fsdp1(trainer.strategy)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # after configure_model and the strategy's setup: FSDP2's fully_shard has replaced the
        # parameters by their sharded DTensors, and layers built in configure_model exist
        self._close()
        multi = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        self.analyzer = Analyzer(
            pl_module,
            self.save_path,
            layers=self.layers,
            weights=self.weights,
            activations=self.activations,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            sync=rank_sync_for(pl_module) if multi else None,
            **self.analyzer_kwargs,
        )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()
        self._loss = None

    # -- recording ----------------------------------------------------------------------------
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        # Lightning divides each micro-batch loss by accumulate_grad_batches: their sum is the mean.
        detached = loss.detach()
        self._loss = detached if self._loss is None else self._loss + detached

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        analyzer = self.analyzer
        if analyzer is None or analyzer.closed or not analyzer.has_new_gradients:
            return  # no backward since the last step (e.g. training_step returned None)
        analyzer.step(loss=self._loss)
        self._loss = None

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.analyzer is None or self.analyzer.closed:
            return
        # EmptyEpochError: no optimizer step in this epoch (accumulation across the epoch's end)
        with contextlib.suppress(EmptyEpochError):
            self.analyzer.end_epoch(trainer.current_epoch)


def refuse_fsdp1(strategy: Any) -> None:
    """Raise ``TypeError`` for Lightning's ``FSDPStrategy`` (FSDP1), saying what to use instead."""
    from bbdecoder.integrations.sharded import FSDP1_MESSAGE

    if type(strategy).__name__ == "FSDPStrategy":
        raise TypeError(f"BBDecoderCallback: {FSDP1_MESSAGE}")


__all__ = ["BBDecoderCallback", "refuse_fsdp1"]
