"""A Hugging Face ``TrainerCallback`` that runs the training monitor inside ``Trainer.train``.

Needs ``transformers`` (and ``accelerate``, which its ``Trainer`` needs); importing :mod:`bbdecoder` or
:mod:`bbdecoder.integrations` never imports it, only this module does.

Why not record in ``on_pre_optimizer_step``: the ``Trainer`` calls ``clip_grad_norm_`` *before* that
event (and before every other callback event of the optimizer step), so the gradients a callback sees
there are already clipped. This callback records at the end of the backward pass of the last
micro-batch of each optimizer step instead, through a post-accumulate-grad hook on the parameters
that queues one autograd-engine callback per backward pass: the gradients are then complete
(accumulated over all micro-batches) and not yet clipped. The last micro-batch is the one for which the
``Trainer`` sets accelerate's ``GradientState.sync_gradients``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.monitor.analyzer import Analyzer, EmptyEpochError

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bbdecoder.integrations.transformers needs Hugging Face transformers: "
        "pip install 'bbdecoder[transformers]' (or pip install transformers accelerate)"
    ) from error


def _output_loss(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.detach().reshape(())
    return None


class BBDecoderTrainerCallback(TrainerCallback):
    """Record the :class:`~bbdecoder.monitor.Analyzer` statistics of the ``Trainer``'s model.

    - The analyzer is built in ``on_train_begin`` on the model the ``Trainer`` passes to callbacks
      (``trainer.model``), so layer and parameter names are those of its ``state_dict()``.
    - Each optimizer step is recorded once, from the gradients accumulated over all its micro-batches
      (gradient accumulation), **before** the ``Trainer``'s gradient clipping: the whole-model L2 of
      the stored per-parameter ``l2`` equals the ``grad_norm`` the ``Trainer`` logs. Under fp16 AMP
      the ``GradScaler`` of the accelerated optimizer is passed to the analyzer, so the statistics are
      of the unscaled gradients; under bf16 autocast the gradients are float32 already.
    - The step's loss is the mean over its micro-batches of the ``loss`` the model returns (the
      ``Trainer``'s default loss); a model that returns none leaves the loss empty.
    - ``on_epoch_end`` closes the epoch (the ``Trainer``'s 0-based epoch number); ``on_train_end``
      closes the analyzer (hooks removed, store flushed). The ``Trainer`` has no exception event: if
      ``train()`` raises, call :meth:`close` (or use the callback as a context manager).
    - The model is never modified; training is bit-identical with and without the callback.

    Args:
        save_path: folder of the run store.
        probes: also record :class:`~bbdecoder.monitor.transformer_probes.TransformerProbes`
            statistics (``True``, or a dict of its keyword arguments, e.g. ``{"attention": False}``
            for a model running SDPA attention).
        analyzer_kwargs: passed to :class:`~bbdecoder.monitor.Analyzer` (``layers=``,
            ``weights=``, ``activations=``, ``flush_every=``, ...); ``scaler`` and ``sync`` are set
            from the ``Trainer``.

    Limitation: with reentrant gradient checkpointing the first gradient of a backward pass must be
    produced outside the checkpointed blocks (true for a classification or LM head).
    """

    def __init__(
        self,
        save_path: str | Path = "bbdecoder_run",
        *,
        probes: bool | dict[str, Any] = False,
        **analyzer_kwargs: Any,
    ) -> None:
        super().__init__()
        for reserved in ("scaler", "sync"):
            if reserved in analyzer_kwargs:
                raise TypeError(
                    f"BBDecoderTrainerCallback sets {reserved}= itself from the Trainer; do not pass it"
                )
        self.save_path = Path(save_path)
        self.analyzer_kwargs = analyzer_kwargs
        self.probes = probes
        self.analyzer: Analyzer | None = None
        self._probes: Any = None
        self._hooks = HookManager()
        self._gradient_state: Any = None
        self._queued = False
        self._recorded = False
        self._losses: list[torch.Tensor] = []
        self._epoch = 0
        self._warned = False

    # -- lifetime -----------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        self.close()
        if model is None:
            raise ValueError("BBDecoderTrainerCallback needs the Trainer to pass its model to callbacks")
        optimizer = kwargs.get("optimizer")
        sync = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from bbdecoder.integrations.ddp import RankSync

            sync = RankSync()
        self.analyzer = Analyzer(
            model,
            self.save_path,
            scaler=getattr(optimizer, "scaler", None),
            sync=sync,
            **self.analyzer_kwargs,
        )
        if self.probes:
            from bbdecoder.monitor.transformer_probes import TransformerProbes

            options = self.probes if isinstance(self.probes, dict) else {}
            try:
                self._probes = TransformerProbes(self.analyzer, **options)
            except Exception:
                self.analyzer.close()
                raise
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        if self._gradient_state is None:
            from accelerate.state import GradientState

            self._gradient_state = GradientState()
        self._queued = self._recorded = False
        self._losses = []
        for param in model.parameters():
            if param.requires_grad:
                self._hooks.add(param.register_post_accumulate_grad_hook(self._on_grad))
        self._hooks.forward_hook(model, self._on_forward)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and close the analyzer (finishing its open epoch); idempotent."""
        self._hooks.remove_all()
        if self._probes is not None:
            self._probes.close()
            self._probes = None
        if self.analyzer is not None and not self.analyzer.closed:
            self.analyzer.close()
        self._losses = []

    def __enter__(self) -> BBDecoderTrainerCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording ----------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            loss = _output_loss(output)
            if loss is not None:
                self._losses.append(loss)

    def _on_grad(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            # Runs once, when this backward pass has accumulated every gradient.
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._queued = False
        if self._gradient_state is not None and not self._gradient_state.sync_gradients:
            return  # not the last micro-batch of this optimizer step
        self._record()

    def _record(self) -> None:
        analyzer = self.analyzer
        if analyzer is None or analyzer.closed:
            return
        loss = torch.stack(self._losses).float().mean() if self._losses else None
        self._losses = []
        analyzer.step(loss=loss)
        self._recorded = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._recorded or self.analyzer is None or self.analyzer.closed:
            return
        # No end of backward was seen for this step (e.g. a backward outside autograd's engine).
        if not self._warned:
            warnings.warn(
                "BBDecoderTrainerCallback: recording this step at on_pre_optimizer_step, after the "
                "Trainer's gradient clipping",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned = True
        with contextlib.suppress(RuntimeError):
            self._record()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recorded = False

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch = math.floor(state.epoch or 0)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.analyzer is None or self.analyzer.closed:
            return
        with contextlib.suppress(EmptyEpochError):
            self.analyzer.end_epoch(self._epoch)


__all__ = ["BBDecoderTrainerCallback"]
