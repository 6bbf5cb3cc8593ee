"""The seed's interface of the training monitor: ``forward_propagation``, ``backward_propagation``,
``save_collected_grads``, ``visualize_weight_hist``; :class:`Analyzer` is the
:class:`~bbdecoder.monitor.core.TorchMonitor` with these calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bbdecoder.layers import LayerSelection
from bbdecoder.monitor.core import TorchMonitor


class Analyzer(TorchMonitor):
    """Record gradient, weight and activation statistics of ``model`` while it trains.

    Args:
        model: the model; it is never modified (except by an explicit :meth:`prune_dead`). A
            ``torch.compile``, ``DistributedDataParallel`` or ``DataParallel`` wrapper is seen
            through: names are the unwrapped model's ``state_dict`` names, and
            :meth:`forward_propagation` calls the wrapper.
        save_path: folder of the run store (created). A store that already holds steps is refused
            unless ``resume=True``.
        input_size: e.g. ``(1, 3, 32, 32)``; when given, :meth:`summary` shows output shapes.
        layers: whose parameters are tracked (IDs, names, globs, types, also the name or ID of a
            module with children that owns parameters; ``None``: every trainable parameter, see
            :mod:`bbdecoder.monitor.coverage`).
        weights: record update ratios every step and weight histograms/quantiles every epoch
            (keeps a copy of the tracked parameters; on CPU, where the ratio pass runs after
            ``optimizer.step()`` on the writer thread, two: see ``monitor.ratio_prefetch``).
        activations: layers whose outputs are watched (``None``/``False``: none; ``True``: every
            activation-function module; a selection: those layers, see :meth:`watch_activations`).
        dead_threshold: a unit is dead when its activation is <= this for every sample seen.
        saturation_eps: the margin of the saturation bounds (sigmoid, tanh).
        channel_dim: the unit dimension of watched outputs (``None``: per layer kind, 1 for conv /
            norm / pool outputs ``(N, C, ...)``, the last dim otherwise, e.g. ``(N, L, D)``).
        histogram_bins: number of fixed bins of the weight histograms.
        quantiles: weight quantiles recorded per epoch (numbers in [0, 1]).
        scaler: a ``torch.amp.GradScaler``; statistics are then of the unscaled gradients.
        flush_every: write to the store every this many recorded steps (1: a crash loses at most
            the last step). Above 1 the steps' bookkeeping (rows, epoch aggregates, alert rules)
            also waits for the flush and runs on the writer thread in one go: cheaper where no
            core is spare, the alerts up to this many steps later.
        every: record statistics on the steps whose number is a multiple of this (1: every step;
            a resumed run keeps the grid). Steps in between are counted (step numbers stay those
            of the optimizer steps) but not stored; an epoch of such steps alone still ends with
            its weight statistics. The activation probes (and ``TransformerProbes``) see the
            forwards of the recorded steps only: dead units are those silent in every one of
            them, so a unit firing in fewer than about 1 in ``every`` batches may be reported dead.
        sync: a rank synchroniser for ``torch.distributed`` runs (see
            :class:`bbdecoder.integrations.ddp.RankSync`): it opens the store on one rank only and
            reduces each step's statistics and each epoch's activation state across ranks.
        tensorboard: also log live to TensorBoard: ``True`` (``<save_path>/tensorboard``), a log
            folder, or a :class:`~bbdecoder.monitor.tensorboard.TensorBoardLogger` (needs ``tensorboard``).
        per_sample: per-sample gradient statistics and the gradient noise scale every step (``True``)
            or every ``k`` steps (``k``); under ``sync`` over the global batch of all ranks; see
            :mod:`bbdecoder.monitor.per_sample_recorder`.
        micro_noise_scale: the two-batch gradient noise scale from the micro-batches of accumulated
            steps (single process; see :mod:`bbdecoder.monitor.noise_micro`).
        alerts: the alert rules of :mod:`bbdecoder.alerts` evaluated as steps are recorded, stored as
            events and raised once per kind as an ``AlertWarning``: ``True`` (default thresholds), an
            :class:`~bbdecoder.alerts.AlertConfig`, or ``False``; the engine is :attr:`alerts`.
        resume: append to the store in ``save_path`` (steps and epochs continue after its last ones);
            refused with the reason when it holds another model (other parameter names or shapes).
            Without it a store that holds steps is refused (see :mod:`bbdecoder.monitor.run_folder`).

    The seed's calls (``forward_propagation``, ``backward_propagation``, ``save_collected_grads``,
    ``visualize_weight_hist``) are defined here, the rest in :class:`~bbdecoder.monitor.core.TorchMonitor`.

    Every argument is checked before anything is registered; a constructor that fails leaves no
    hook and no open store behind, and an Analyzer that is dropped without :meth:`close` detaches
    itself when it is garbage-collected (its hooks hold only a weak reference to it).
    """

    def forward_propagation(self, *inputs: Any, **kwargs: Any) -> Any:
        """``model(*inputs, **kwargs)`` through the model as given (a ``torch.compile`` or DDP
        wrapper runs its own forward); activation hooks record when watching."""
        self._check_open()
        return self.wrapped(*inputs, **kwargs)

    def backward_propagation(
        self,
        loss: torch.Tensor,
        collect_grads: bool = True,
        layer_inds: LayerSelection = None,
        *,
        layers: LayerSelection = None,
        retain_graph: bool = False,
    ) -> None:
        """``loss.backward()``, then (``collect_grads``) record the gradient statistics of the
        selected layers (``layers=`` and ``layer_inds=`` are synonyms; ``None``: every tracked layer)."""
        self._check_open()
        if layer_inds is not None and layers is not None and layer_inds != layers:
            raise ValueError("pass the layer selection as layers= or layer_inds=, not both")
        selection = layers if layers is not None else layer_inds
        selected = self._select_params(selection)  # validate before the graph is consumed
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first "
                "(loss.mean() or loss.sum())"
            )
        if loss.grad_fn is None:
            raise ValueError("loss does not require grad: it was computed without a graph (torch.no_grad?)")
        if loss.grad_fn is self._last_grad_fn:
            raise RuntimeError(
                "backward_propagation was already called on this loss and its graph is freed; run a new "
                "forward pass, or pass retain_graph=True to the first call"
            )
        loss.backward(retain_graph=retain_graph)
        self._last_grad_fn = None if retain_graph else loss.grad_fn
        if collect_grads:
            self._record_step(selected, loss.detach())

    def save_collected_grads(
        self, save_folder: str | Path | None = None, ep: int | None = None
    ) -> list[Path]:
        """End epoch ``ep``: store per-epoch aggregates, weight histograms/quantiles and activation
        statistics, then draw the gradient figures of that epoch into ``save_folder`` (default
        ``<save_path>/figures``). Returns the figure paths."""
        epoch = self.end_epoch(ep)
        from bbdecoder.viz.monitor_plots import plot_grad_norms, plot_gradient_flow

        folder = Path(save_folder) if save_folder is not None else self.save_path / "figures"
        return [
            plot_gradient_flow(self.save_path, folder, epoch),
            plot_grad_norms(self.save_path, folder, epoch),
        ]

    def visualize_weight_hist(
        self,
        save_folder: str | Path | None = None,
        layer_inds: LayerSelection = None,
        *,
        layers: LayerSelection = None,
        style: str = "heatmap",
    ) -> list[Path]:
        """Draw each selected parameter's weight histograms over epochs (``style``: ``"heatmap"`` or
        ``"ridge"``), one file per parameter. Records the current weights first when no histogram
        was stored yet. Returns the figure paths."""
        self._check_open()
        selection = layers if layers is not None else layer_inds
        params = self._select_params(selection)
        if not self.writer.has_histograms():
            self._record_weights(self._params, max(self._step - 1, 0), self._epoch)
            self.writer.flush()
        from bbdecoder.viz.monitor_plots import plot_weight_histograms

        folder = Path(save_folder) if save_folder is not None else self.save_path / "figures"
        return plot_weight_histograms(self.save_path, folder, params=[p.name for p in params], style=style)


Master_analyzer = Analyzer
"""The seed's name for :class:`Analyzer`."""
