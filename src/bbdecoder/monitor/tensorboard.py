"""Live TensorBoard logging for the :class:`~bbdecoder.monitor.Analyzer` (``tensorboard=`` option).

Per recorded step: the loss (``loss``) and every gradient statistic of every tracked parameter
(``grad_<stat>/<param>``, e.g. ``grad_l2/conv1.weight``); with ``per_sample=`` on its steps the
per-sample statistics and the noise scale (``sample_var/<param>``, ``noise_scale/model``, see
:func:`stat_tag`), and under DDP with ``noise_scale=True`` the ranks' estimate. Every
``histogram_every`` steps: the histograms of each parameter's weights (``weights/<param>``) and
gradients (``grads/<param>``) and a gradient-flow bar chart image (``gradient_flow``). The exporter
of finished runs (:func:`bbdecoder.store.export.export_tensorboard`) uses the same tag names for what
both write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bbdecoder.monitor.grad_stats import GRAD_STATS

TENSORBOARD_DIRNAME = "tensorboard"


def summary_writer(log_dir: str | Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``, with a clear error when the
    ``tensorboard`` package is missing."""
    # TensorBoard imports TensorFlow when it is installed; keep its start-up logging quiet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError when the tensorboard package is absent
        raise ImportError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard "
            "(or pip install 'bbdecoder[tensorboard]')"
        ) from err
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))


def grad_tag(stat: str, param: str) -> str:
    """The TensorBoard tag of a gradient statistic: ``grad_<stat>/<param>``."""
    return f"grad_{stat}/{param}"


def stat_tag(stat: str, param: str) -> str:
    """The tag of any other stored statistic: ``<stat>/<param>``, ``<stat>/model`` for the whole
    model (``param`` ``"*"``), e.g. ``sample_var/fc.weight``, ``noise_scale/model``."""
    return f"{stat}/{'model' if param in ('*', '') else param}"


def per_sample_scalars(
    names: Sequence[str], table: Sequence[Sequence[float]], model_values: Mapping[str, float]
) -> dict[str, float]:
    """The tags and values of one per-sample step: ``table`` holds a row of (``sample_norm_mean``,
    ``sample_var``, ``sample_grad_sq``) per tensor of ``names`` and a last row for the whole model;
    ``model_values`` the whole model's ``batch_size``, ``noise_scale``, ... ."""
    from bbdecoder.monitor.per_sample_recorder import PER_SAMPLE_STATS

    out: dict[str, float] = {}
    for name, row in zip([*names, "*"], table, strict=True):
        for stat, value in zip(PER_SAMPLE_STATS, row, strict=True):
            out[stat_tag(stat, name)] = float(value)
    out.update({stat_tag(stat, "*"): float(v) for stat, v in model_values.items()})
    return out


def gradient_flow_image(names: Sequence[str], mean_abs: np.ndarray, max_abs: np.ndarray) -> np.ndarray:
    """A gradient-flow bar chart (mean and max |g| per parameter, log axis) as an (H, W, 3) uint8 image."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(max(5.0, 0.3 * len(names)), 3.2), dpi=80)
    x = np.arange(len(names))
    axis.bar(x, max_abs, color="c", alpha=0.5, label="max |g|")
    axis.bar(x, mean_abs, color="b", alpha=0.7, label="mean |g|")
    positive = np.concatenate([mean_abs, max_abs])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if positive.size:
        axis.set_yscale("log")
        axis.set_ylim(float(positive.min()) / 2, float(positive.max()) * 2)
    axis.set_xticks(x, list(names), rotation=90, fontsize=6)
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())  # type: ignore[attr-defined]
    plt.close(figure)
    return np.ascontiguousarray(rgba[:, :, :3])


class TensorBoardLogger:
    """Writes what the Analyzer records to TensorBoard event files, as it records it.

    Args:
        log_dir: folder of the event files (created).
        histogram_every: weight/gradient histograms and the gradient-flow image every this many
            steps (and at the first step); ``0`` turns them off.
        scalars_every: gradient statistics every this many steps (the loss is logged every step).
    """

    def __init__(self, log_dir: str | Path, *, histogram_every: int = 50, scalars_every: int = 1) -> None:
        if histogram_every < 0 or scalars_every < 1:
            raise ValueError(
                f"histogram_every must be >= 0 and scalars_every >= 1, got {histogram_every}, {scalars_every}"
            )
        self.log_dir = Path(log_dir)
        self.histogram_every = histogram_every
        self.scalars_every = scalars_every
        self.writer = summary_writer(self.log_dir)
        self.closed = False

    def record_step(
        self,
        step: int,
        names: Sequence[str],
        values: np.ndarray,
        loss: float | None,
        params: Mapping[str, torch.Tensor],
    ) -> None:
        """Log one step: ``values`` is (len(names), len(GRAD_STATS)) in the order of ``GRAD_STATS``;
        ``params`` maps state_dict names to the parameter tensors (read for histograms only)."""
        if self.closed:
            return
        if loss is not None:
            self.writer.add_scalar("loss", loss, step)
        if step % self.scalars_every == 0:
            for name, row in zip(names, values, strict=True):
                for stat, value in zip(GRAD_STATS, row, strict=True):
                    self.writer.add_scalar(grad_tag(stat, name), float(value), step)
        if self.histogram_every and step % self.histogram_every == 0:
            for name, tensor in params.items():
                self.writer.add_histogram(f"weights/{name}", tensor.detach().float().cpu(), step)
                if tensor.grad is not None and bool(torch.isfinite(tensor.grad).all()):
                    self.writer.add_histogram(f"grads/{name}", tensor.grad.detach().float().cpu(), step)
            columns = {stat: i for i, stat in enumerate(GRAD_STATS)}
            image = gradient_flow_image(names, values[:, columns["mean_abs"]], values[:, columns["max_abs"]])
            self.writer.add_image("gradient_flow", image, step, dataformats="HWC")

    def record_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log ``{tag: value}`` at ``step`` (per-sample statistics, the noise scale)."""
        if self.closed:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        if not self.closed:
            self.writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True


def tensorboard_logger(option: Any, save_path: str | Path, sync: Any = None) -> TensorBoardLogger | None:
    """The logger for the Analyzer's ``tensorboard=`` option: ``None``/``False`` -> none, ``True`` ->
    ``<save_path>/tensorboard``, a path -> that folder, a :class:`TensorBoardLogger` -> itself.
    In a distributed run (``sync`` given) only the rank that writes the store logs."""
    if option is None or option is False:
        return None
    if sync is not None and not getattr(sync, "is_writer", True):
        return None
    if isinstance(option, TensorBoardLogger):
        return option
    if option is True:
        return TensorBoardLogger(Path(save_path) / TENSORBOARD_DIRNAME)
    if isinstance(option, (str, Path)):
        return TensorBoardLogger(option)
    raise TypeError(
        f"tensorboard= takes True, a log folder or a TensorBoardLogger, got {type(option).__name__}"
    )
