"""Looking inside while training: intermediate features over epochs, per-layer cost, the architecture.

A mixin of :class:`bbdecoder.monitor.Analyzer`; it uses the analyzer's model, layer index, run store
and current step/epoch, and never changes the model (eval mode for every look, modes restored).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bbdecoder.inspect.architecture import draw_architecture
from bbdecoder.inspect.cost import LayerCost, cost_frame, layer_costs, plot_layer_costs
from bbdecoder.inspect.features import (
    capture_layer_output,
    feature_grid,
    small_multiples,
    write_gif,
    write_mp4,
)
from bbdecoder.layers import LayerIndex, LayerInfo
from bbdecoder.report.blobs import store_image, store_table
from bbdecoder.store.vocabulary import FEATURES_BLOB
from bbdecoder.store.writer import RunWriter

FEATURES_KIND = FEATURES_BLOB


class InspectionMixin:
    """``get_inter_features``, ``compile_feature_evolution``, ``layer_costs``, ``architecture``."""

    model: nn.Module
    index: LayerIndex
    writer: RunWriter
    save_path: Path
    _output_shapes: dict[int, list[int]]

    # provided by Analyzer
    input_size: tuple[int, ...] | None

    @property
    def current_step(self) -> int:
        raise NotImplementedError

    @property
    def current_epoch(self) -> int:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def paused(self) -> Any:
        raise NotImplementedError

    def _one_layer(self, layer: int | str | nn.Module) -> LayerInfo:
        chosen = self.index.select(layer)
        if len(chosen) != 1:
            raise ValueError(f"{layer!r} selects {len(chosen)} layers; give exactly one (an ID or a name)")
        return chosen[0]

    def get_inter_features(
        self,
        test_input: Any,
        layer: int | str | nn.Module,
        path: str | Path | None = None,
        post_proc: Callable[[Any], Any] | None = None,
        dim: int | Sequence[int] | None = None,
    ) -> Any:
        """The output of ``layer`` for ``test_input``, recorded in the run store at the current step/epoch.

        Returns what the layer returns, detached: a tensor ``(N, C, ...)``, or a tuple/list/dict of them
        (the structure is kept; every tensor in it is recorded, named ``layer[i]`` or ``layer[key]``).
        ``post_proc`` is applied to that output before ``dim`` and before saving; ``dim`` selects
        channels (dim 1) of every tensor: an int or a list of ints. With ``path`` (a ``.png`` file or a
        folder) the first sample's channels are also saved as a grid image. The model runs in eval
        mode with gradients off and its modes are restored; activation statistics ignore this pass.
        """
        self._check_open()
        info = self._one_layer(layer)
        with self.paused():
            output = capture_layer_output(self.model, test_input, info.module)
        if post_proc is not None:
            output = post_proc(output)
        output = _map_tensors(output, lambda t: _select_channels(t, dim))
        for suffix, tensor in _named_tensors(output):
            self.writer.add_array(
                FEATURES_KIND,
                info.display_name + suffix,
                tensor.cpu().numpy(),
                step=self.current_step,
                epoch=self.current_epoch,
                layer_id=info.id,
                meta={"dim": dim if not isinstance(dim, Sequence) else list(dim)},
            )
        if path is not None:
            first = next((t for _, t in _named_tensors(output)), None)
            if first is not None and first.dim() >= 3:
                target = Path(path)
                if target.suffix != ".png":
                    target = target / f"features_{_slug(info.display_name)}_epoch{self.current_epoch}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.fromarray(feature_grid(first[0])).save(target)
        return output

    def compile_feature_evolution(
        self,
        layer: int | str | nn.Module,
        fps: float = 5,
        *,
        save_folder: str | Path | None = None,
        sample: int = 0,
        max_channels: int = 16,
        scale: int = 4,
    ) -> dict[str, Path | None]:
        """Animate the recorded features of ``layer`` over epochs: ``{"gif", "mp4", "figure"}`` paths.

        One frame per recorded epoch (its last recording), every frame on the same colour scale
        (the range over all frames) so change is visible; ``mp4`` is ``None`` without ffmpeg. The
        static small-multiples figure also goes into the run store (report section "features").
        """
        info = self._one_layer(layer)
        self.writer.flush()
        frames, labels = self._feature_frames(info, sample, max_channels)
        low = min(float(np.min(f)) for f in frames)
        high = max(float(np.max(f)) for f in frames)
        pictures = [feature_grid(f, vmin=low, vmax=high, max_channels=max_channels) for f in frames]
        folder = Path(save_folder) if save_folder is not None else self.save_path / "features"
        stem = f"feature_evolution_{_slug(info.display_name)}"
        gif = write_gif(pictures, folder / f"{stem}.gif", fps=fps, scale=scale)
        mp4 = write_mp4(pictures, folder / f"{stem}.mp4", fps=fps)
        figure = small_multiples(
            pictures, labels, title=f"[{info.id}] {info.display_name}: features over epochs"
        )
        from bbdecoder.viz.grids import save_figure

        figure_path = save_figure(figure, folder / f"{stem}.png")
        store_image(
            self.writer,
            f"feature_evolution/{info.display_name}",
            figure_path.read_bytes(),
            section="features",
            caption=f"[{info.id}] {info.display_name}, sample {sample}: {', '.join(labels)}; "
            f"one colour scale [{low:.3g}, {high:.3g}]",
        )
        return {"gif": gif, "mp4": mp4, "figure": figure_path}

    def _feature_frames(
        self, info: LayerInfo, sample: int, max_channels: int
    ) -> tuple[list[np.ndarray], list[str]]:
        from bbdecoder.store.reader import RunReader

        with RunReader(self.writer.path) as reader:
            records = reader.blobs(kind=FEATURES_KIND, name=info.display_name)
            if records.empty:
                raise ValueError(
                    f"no features recorded for layer [{info.id}] {info.display_name}; call "
                    "get_inter_features(test_input, layer) once per epoch first"
                )
            last_per_epoch = records.groupby("epoch", sort=True).tail(1)
            frames, labels = [], []
            for blob_id, epoch in zip(last_per_epoch["blob_id"], last_per_epoch["epoch"], strict=True):
                array = reader.array(int(blob_id))
                if array.ndim < 3:
                    raise ValueError(f"layer {info.display_name} recorded {array.shape}; need (N, C, H[, W])")
                frames.append(array[sample][:max_channels])
                labels.append(f"epoch {int(epoch)}")
        return frames, labels

    def layer_costs(
        self, inputs: Any = None, *, repeats: int = 5, save_folder: str | Path | None = None
    ) -> list[LayerCost]:
        """Per-layer parameters, FLOPs, activation bytes and forward time (see
        :func:`bbdecoder.inspect.layer_costs`) on ``inputs`` (default: zeros of ``input_size``).

        The table and a bar chart go into the run store (report section "cost"); with
        ``save_folder`` the chart ``layer_costs.png`` is also saved there.
        """
        inputs = self._example_input(inputs)
        with self.paused():
            costs = layer_costs(self.model, inputs, repeats=repeats)
        store_table(self.writer, "layer_costs", cost_frame(costs), section="cost", caption="Per-layer cost")
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(save_folder) if save_folder is not None else Path(scratch)
            chart = plot_layer_costs(costs, folder / "layer_costs.png")
            store_image(
                self.writer, "layer_costs", chart.read_bytes(), section="cost", caption="FLOPs and time"
            )
        return costs

    def architecture(
        self, inputs: Any = None, path: str | Path | None = None, *, engine: str = "auto"
    ) -> Path:
        """Draw the executed graph with every module labelled by its layer ID (SVG or PNG).

        Default path: ``<save_path>/architecture.png``; a PNG of it also goes into the run store
        (report section "architecture").
        """
        from bbdecoder.monitor.graph import trace_graph

        inputs = self._example_input(inputs)
        with self.paused():
            graph = trace_graph(self.model, inputs)
        target = draw_architecture(
            graph, self.index, path or self.save_path / "architecture.png", engine=engine
        )
        with tempfile.TemporaryDirectory() as scratch:
            png = target if target.suffix == ".png" else Path(scratch) / "architecture.png"
            if png != target:
                draw_architecture(graph, self.index, png, engine=engine)
            store_image(self.writer, "architecture", png.read_bytes(), section="architecture")
        return target

    def _example_input(self, inputs: Any) -> Any:
        if inputs is not None:
            return inputs
        size = self.input_size
        if size is None:
            raise ValueError("give example inputs, or create the Analyzer with input_size=(1, C, H, W)")
        reference = next(self.model.parameters(), None)
        return torch.zeros(size, device=reference.device if reference is not None else None)


def _select_channels(tensor: torch.Tensor, dim: int | Sequence[int] | None) -> torch.Tensor:
    if dim is None:
        return tensor
    if tensor.dim() < 2:
        raise ValueError(f"dim selects channels (dim 1), but the output has shape {tuple(tensor.shape)}")
    channels = [dim] if isinstance(dim, int) else list(dim)
    bad = [c for c in channels if not -tensor.shape[1] <= c < tensor.shape[1]]
    if bad:
        raise IndexError(f"channels {bad} out of range: the output has {tensor.shape[1]} channels")
    return tensor[:, channels]


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _named_tensors(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _named_tensors(v, f"{prefix}[{i}]")]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _named_tensors(v, f"{prefix}[{k}]")]
    return []


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "root"
