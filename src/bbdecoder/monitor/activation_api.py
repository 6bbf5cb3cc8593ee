"""Activation watching and pruning of the training monitor (a mixin of
:class:`~bbdecoder.monitor.Analyzer`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager, preserved_state
from bbdecoder.layers import LayerInfo, LayerSelection
from bbdecoder.monitor.activations import ACTIVATION_FUNCTIONS, channel_similarity
from bbdecoder.monitor.pruning import PrunedUnits, PruneReport, make_permanent, mask_channels, output_channels
from bbdecoder.monitor.settings import check_settings
from bbdecoder.store.vocabulary import PRUNE


class ActivationsMixin:
    """``watch_activations``, ``paused``, ``dead_units``, ``get_sim``, ``prune_dead``."""

    def watch_activations(
        self: Any,
        layers: LayerSelection = None,
        threshold: float = 0.0,
        eps: float = 1e-3,
        dim: int | None = None,
    ) -> None:
        """Watch the outputs of ``layers`` (forward hooks, removed by :meth:`close`; ``None``: every
        activation-function module). Only forwards in training mode are recorded. Per epoch the store
        gets ``channel_var`` for every watched layer, ``saturated_fraction`` for activation modules
        with a saturation test, and ``dead_fraction``/``dead_count`` (a unit is dead when its output
        was ``<= threshold`` for every sample and position) for rectifiers (ReLU family) and for
        every layer named here. ``dim``: the unit dimension (``None``: per layer kind)."""
        self._check_open()
        check_settings(1, 1, (0.5,), dim, 1, eps, threshold)
        chosen, named = self._activation_layers(True if layers is None else layers)
        self._activations.watch(chosen, threshold, eps, dim, named=named)
        self._activations.check_dims(self._output_shapes)

    def _activation_layers(self: Any, activations: LayerSelection | bool) -> tuple[list[LayerInfo], bool]:
        if activations is None or activations is False:
            return [], False
        if activations is True:
            found = [L for L in self.index if isinstance(L.module, ACTIVATION_FUNCTIONS)]
            if not found:
                warnings.warn(
                    "activations=True found no activation-function module (functional calls such as "
                    "F.relu are not modules); name the layers to watch, e.g. activations=['conv1']",
                    stacklevel=3,
                )
            return found, False
        if isinstance(activations, Sequence) and not isinstance(activations, str) and len(activations) == 0:
            raise ValueError("activations=[] watches nothing; pass None, True or some layers")
        return self.index.select(activations), True

    @contextlib.contextmanager
    def paused(self: Any) -> Iterator[None]:
        """Within this block, forward passes are not recorded by the activation hooks."""
        old, self._activations.paused = self._activations.paused, True
        try:
            yield
        finally:
            self._activations.paused = old

    def dead_units(self: Any, threshold: float | None = None) -> dict[str, list[int]]:
        """``{layer name: dead channel indices}`` from the current epoch's data (or, when none was
        seen yet, the last finished epoch). ``threshold`` overrides the watch threshold."""
        dead = self._activations.dead_by_id(threshold)
        return {self.index[lid].display_name: units for lid, units in dead.items()}

    def get_sim(self: Any, inputs: Any, layer: int | str, dim: int = 1) -> torch.Tensor:
        """Cosine similarity ``(C, C)`` between the channels of ``layer``'s output on ``inputs``
        (one forward, no_grad, eval mode, model restored)."""
        chosen = self.index.select(layer)
        if len(chosen) != 1:
            raise ValueError(f"get_sim needs exactly one layer, {layer!r} selects {len(chosen)}")
        info = chosen[0]
        captured: list[torch.Tensor] = []
        with (
            HookManager() as hooks,
            preserved_state(self.model, eval_mode=True),
            torch.no_grad(),
            self.paused(),
        ):
            hooks.forward_hook(info.module, lambda _m, _i, out: captured.append(out))
            self.model(inputs)
        if not captured:
            raise RuntimeError(f"layer {info.display_name} did not run in the forward pass")
        return channel_similarity(captured[0], dim)

    # -- pruning ------------------------------------------------------------------------------
    def prune_dead(
        self: Any,
        layers: LayerSelection = None,
        threshold: float | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
    ) -> PruneReport:
        """Mask the dead units of watched ``layers`` with ``torch.nn.utils.prune`` and report them.

        The producer of a dead channel is the layer itself when it has a weight with that many
        output channels, else the nearest preceding leaf (in declaration order) that has one (e.g.
        the BatchNorm or Conv before a ReLU). This **modifies the model by design** (``_orig``
        parameters, ``_mask`` buffers, pre-hooks); :meth:`make_pruning_permanent` folds the masks.
        ``evaluate(model) -> float`` is called before and after (recording paused, modes restored).
        """
        self._check_open()
        dead = self._activations.dead_by_id(threshold)
        wanted = {L.id for L in self.index.select(layers)}
        report = PruneReport()
        if evaluate is not None:
            report.accuracy_before = self._evaluate(evaluate)
        for layer_id, channels in dead.items():
            if layer_id not in wanted or not channels:
                continue
            layer = self.index[layer_id]
            name = layer.display_name
            cmax = self._activations.channel_max(layer_id)
            assert cmax is not None
            producer = self._producer(layer, len(cmax))
            if producer is None:
                warnings.warn(
                    f"no layer with a weight produces the channels of {name}; not pruned", stacklevel=2
                )
                continue
            pruned = mask_channels(producer.module, channels)
            self._pruned += [(producer.module, n) for n in pruned]
            report.entries.append(PrunedUnits(layer.id, name, channels, producer.display_name, pruned))
        if evaluate is not None:
            report.accuracy_after = self._evaluate(evaluate)
        self.writer.add_event(
            PRUNE,
            str(report),
            step=self._step - 1,
            epoch=self._epoch,
            data={
                "entries": [e.__dict__ for e in report.entries],
                "before": report.accuracy_before,
                "after": report.accuracy_after,
            },
        )
        self.writer.flush()
        return report

    def _producer(self: Any, layer: LayerInfo, channels: int) -> LayerInfo | None:
        for candidate in reversed(list(self.index)[: layer.id + 1]):
            if output_channels(candidate.module) == channels:
                return candidate
        return None

    def _evaluate(self: Any, evaluate: Callable[[nn.Module], float]) -> float:
        with preserved_state(self.model), self.paused():
            return float(evaluate(self.model))

    def make_pruning_permanent(self: Any) -> None:
        """Fold the pruning masks into plain parameters and remove the pruning hooks."""
        make_permanent(self._pruned)
        self._pruned.clear()
