"""The seed's interface of the training monitor: ``forward_propagation``, ``backward_propagation``,
``save_collected_grads``, ``visualize_weight_hist`` (a mixin of :class:`~bbdecoder.monitor.Analyzer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bbdecoder.layers import LayerSelection


class SeedInterface:
    """The original BBDecoder calls, on top of the analyzer's recording."""

    def forward_propagation(self: Any, *inputs: Any, **kwargs: Any) -> Any:
        """``model(*inputs, **kwargs)`` through the model as given (a ``torch.compile`` or DDP
        wrapper runs its own forward); activation hooks record when watching."""
        self._check_open()
        return self.wrapped(*inputs, **kwargs)

    def backward_propagation(
        self: Any,
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
        self: Any, save_folder: str | Path | None = None, ep: int | None = None
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
        self: Any,
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
