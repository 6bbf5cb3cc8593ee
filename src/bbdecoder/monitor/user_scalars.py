"""The user's own values in the run store: ``Analyzer.log(**scalars)`` and the optimizers' learning rates.

Where they are stored (read them with ``open_run(path).scalars()`` / ``.epoch_scalars()``):

* ``log(name=value)`` -- a per-step row ``(step, epoch, layer_id=-1, param="user", stat=name)``; the
  step is the last one the Analyzer counted (the optimizer step just taken), or ``step=`` when given;
* ``log(epoch=e, name=value)`` -- a per-epoch row ``(epoch, layer_id=-1, param="user", stat=name,
  agg="value")``; ``epoch=True`` means the epoch the values are about (the one that just ended when
  no step was recorded since);
* ``log(loss=value)`` -- also the step's ``loss`` in ``open_run(path).steps()`` (the report's loss
  curve);
* the learning rate of every attached optimizer, at each recorded step, as ``(layer_id=-1,
  param="optimizer", stat="lr")`` (``lr_group{i}`` for parameter group i > 0, ``opt{j}_`` prefixed
  for a second attached optimizer j > 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from bbdecoder.store.background import after_held_steps
from bbdecoder.store.vocabulary import AGG_VALUE, OPTIMIZER_PARAM, USER_LAYER_ID, USER_PARAM

__all__ = [
    "OPTIMIZER_PARAM",
    "USER_LAYER_ID",
    "USER_PARAM",
    "UserLogMixin",
    "check_epoch",
    "learning_rates",
    "scalar_value",
]


def scalar_value(name: str, value: Any) -> float:
    """``value`` as a float: a Python or NumPy number, or a one-element tensor (copied to the host)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"log({name}=...) takes one number; got a tensor of shape {tuple(value.shape)} "
                "(reduce it first, e.g. .mean())"
            )
        return float(value.detach().reshape(()).item())
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(()))
    raise TypeError(f"log({name}=...) takes a number or a one-element tensor, got {type(value).__name__}")


def check_epoch(epoch: Any) -> int | bool | None:
    if epoch is None or epoch is True:
        return epoch
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise TypeError(f"log(epoch=...) takes an epoch number >= 0 or True, got {epoch!r}")
    return int(epoch)


def learning_rates(optimizers: list[torch.optim.Optimizer]) -> list[tuple[str, float]]:
    """``(stat name, lr)`` for every param group of every optimizer (groups without ``lr`` skipped)."""
    out: list[tuple[str, float]] = []
    for j, optimizer in enumerate(optimizers):
        prefix = f"opt{j}_" if j else ""
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                lr = float(lr.detach().reshape(-1)[0].item()) if lr.numel() else None
            if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(float(lr)):
                out.append((f"{prefix}lr" + (f"_group{i}" if i else ""), float(lr)))
    return out


class UserLogMixin:
    """``Analyzer.log`` and the learning rates of attached optimizers (a mixin of the Analyzer)."""

    def log(self: Any, *, epoch: int | bool | None = None, step: int | None = None, **scalars: Any) -> None:
        """Store your own values in the run: ``log(val_acc=0.91)``, ``log(loss=loss)``, ``log(epoch=3, ...)``.

        Each value is a number or a one-element tensor. Per step (default) the values are labelled with
        the optimizer step just counted (call after ``optimizer.step()``; ``step=`` to choose another)
        and read back with ``open_run(path).scalars()`` as rows ``layer_id=-1, param="user",
        stat=<name>``; ``loss=`` is also the step's loss in ``steps()`` (the report's loss curve).
        With ``epoch=`` (a number, or ``True`` for the epoch the values are about: the one that just
        ended when no step was recorded since) they are per-epoch rows of ``epoch_scalars()`` with
        ``agg="value"``. The learning rates of attached optimizers are recorded without a call. See
        :mod:`bbdecoder.monitor.user_scalars`.
        """
        self._check_open()
        if not scalars:
            raise TypeError("log() needs at least one value, e.g. analyzer.log(val_acc=0.9)")
        epoch = check_epoch(epoch)
        values = [(name, scalar_value(name, value)) for name, value in scalars.items()]
        series = self.writer.series_id(USER_LAYER_ID, USER_PARAM)
        if epoch is not None:
            if step is not None:
                raise TypeError("log() takes step= or epoch=, not both")
            if epoch is True:
                ended = self._epoch_first_step is None and self._step > self._first_step and self._epoch > 0
                epoch = self._epoch - 1 if ended else self._epoch
            self.writer.add_epoch_scalars(
                [(int(epoch), series, self.writer.stat_id(name), AGG_VALUE, v) for name, v in values]
            )
            self.writer.flush()  # an epoch's values at once
            return
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise TypeError(f"log(step=...) takes a step number >= 0, got {step!r}")
        at = step if step is not None else (self._step - 1 if self._step > self._first_step else self._step)
        writer = self.writer
        rows = [(at, self._epoch, series, writer.stat_id(name), v) for name, v in values]
        set_loss = getattr(writer, "set_loss", None) if "loss" in scalars else None  # non-writing ranks: none
        loss = dict(values).get("loss")
        after_held_steps(writer, partial(_add_user_rows, writer, rows, set_loss, at, loss))
        # per-step values are written with the next step's flush (and by close)

    def _log_learning_rates(self: Any) -> None:
        rates = learning_rates(self._optimizers)
        if rates:
            series = self.writer.series_id(USER_LAYER_ID, OPTIMIZER_PARAM)
            step = self._step - 1
            rows = [(step, self._epoch, series, self.writer.stat_id(n), v) for n, v in rates]
            after_held_steps(self.writer, partial(self.writer.add_scalars, rows))


def _add_user_rows(
    writer: Any, rows: list[Any], set_loss: Callable[[int, float], None] | None, step: int, loss: float | None
) -> None:
    writer.add_scalars(rows)
    if set_loss is not None and loss is not None:
        set_loss(step, loss)
