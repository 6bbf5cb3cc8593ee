"""ActivationWatcher: the forward hooks that feed :class:`ActivationProbe` objects, and the
per-epoch rows they produce in the run store."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.layers import LayerIndex, LayerInfo
from bbdecoder.monitor.activation_rows import ProbeEpoch, store_activation_epoch
from bbdecoder.monitor.activations import ACTIVATION_FUNCTIONS, CHANNELS_FIRST, RECTIFIERS, ActivationProbe
from bbdecoder.monitor.element_counts import MaskBuffer
from bbdecoder.store import vocabulary as V
from bbdecoder.store.writer import RunWriter

PASS_THROUGH = (*ACTIVATION_FUNCTIONS, nn.Dropout, nn.Identity, nn.AlphaDropout)
"""Parameter-free leaves that keep the unit count of their input."""

ACTIVATION_STATS = V.ACTIVATION_STATS


def default_channel_dim(layer: LayerInfo, index: LayerIndex) -> int:
    """The unit dimension for ``layer``'s output: 1 for conv/norm/pool kinds ``(N, C, ...)``, the last
    dim otherwise (``(N, D)``, transformer ``(N, L, D)``). A parameter-free layer (an activation,
    Dropout) takes the kind of the nearest preceding leaf that has parameters."""
    for candidate in reversed(list(index)[: layer.id + 1]):
        if candidate is layer or candidate.num_params > 0:
            if isinstance(candidate.module, CHANNELS_FIRST):
                return 1
            if candidate.num_params > 0:
                return -1
    return -1


def expected_channels(layer: LayerInfo, index: LayerIndex) -> tuple[int, torch.device] | None:
    """``(units, device)`` of ``layer``'s output along its default dim, read from the weights of the
    layer or of the nearest preceding leaf with parameters (``None`` when it cannot be known before a
    forward). Allocating probe state up front keeps a compiled forward from recompiling when the
    state appears after the first call."""
    for candidate in reversed(list(index)[: layer.id + 1]):
        weight = getattr(candidate.module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            size = weight.shape[-1] if isinstance(candidate.module, nn.Embedding) else weight.shape[0]
            return int(size), weight.device
        if candidate is not layer and candidate.num_params > 0:
            return None
        if candidate is not layer and not isinstance(candidate.module, PASS_THROUGH):
            return None
    return None


class ActivationWatcher:
    """Watches layer outputs in training-mode forwards (never while ``paused`` is true), those of
    the steps the monitor records (:meth:`arm` says whether the next one is)."""

    def __init__(self, index: LayerIndex, writer: RunWriter, hooks: HookManager) -> None:
        self.index = index
        self.writer = writer
        self.hooks = hooks
        self.probes: dict[int, ActivationProbe] = {}
        self.last_max: dict[int, torch.Tensor] = {}
        self.paused = False
        # a plain bool read by the hooks: a compiled forward guards on it (one graph per value)
        self.off_step = False
        self.checked = False
        self.masks = MaskBuffer()  # the saturation counts' comparisons, shared by every probe

    def watch(
        self, layers: list[LayerInfo], threshold: float, eps: float, dim: int | None, *, named: bool
    ) -> None:
        """Hook ``layers``; dead units are counted on rectifiers, and on every layer when ``named``."""
        for layer in layers:
            if layer.id in self.probes:
                continue
            layer_dim = default_channel_dim(layer, self.index) if dim is None else dim
            dead = named or isinstance(layer.module, RECTIFIERS)
            probe = ActivationProbe(layer.module, threshold, eps, layer_dim, dead=dead)
            expected = expected_channels(layer, self.index) if dim is None else None
            if expected is not None:
                probe.allocate(*expected)
            self.probes[layer.id] = probe
            self.writer.series_id(layer.id, V.ACTIVATION_PARAM)
            self.hooks.forward_hook(layer.module, self._hook(probe, layer))

    def arm(self, recorded: bool) -> None:
        """The forwards that follow are watched when the step they belong to is ``recorded``."""
        self.off_step = not recorded

    def _hook(self, probe: ActivationProbe, layer: LayerInfo) -> Callable[..., None]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.paused or self.off_step or not module.training:
                return
            if isinstance(output, torch.Tensor):
                out: torch.Tensor | None = output
            elif isinstance(output, (tuple, list)):
                out = next((o for o in output if isinstance(o, torch.Tensor)), None)
            else:
                out = None
            if out is None or out.dim() < 1:
                return
            if not -out.dim() <= probe.dim < out.dim():
                return  # checked on the host once (see check_dims); never raise inside a forward
            probe.update(out, self.masks)  # reads it only: no no_grad block (20 us from cold caches)

        return hook

    def forwards_seen(self) -> float:
        """Forwards recorded by all probes this epoch (one host read)."""
        counts = [p.forwards for p in self.probes.values() if p.forwards is not None]
        return float(torch.stack(counts).sum().cpu()) if counts else 0.0

    def record(self, step: int, epoch: int) -> None:
        """Store this epoch's activation statistics (one host copy for all layers) and reset."""
        live = {lid: pr for lid, pr in self.probes.items() if pr.seen}
        if not live:
            return
        parts = []
        for probe in live.values():
            assert probe.max is not None and probe.saturated is not None and probe.total is not None
            assert probe.channel_var is not None and probe.forwards is not None
            parts.append(probe.max.double())
            parts.append(torch.stack([probe.saturated, probe.total, probe.channel_var, probe.forwards]))
        host = torch.cat([p.to(parts[0].device) for p in parts]).cpu().numpy()
        states, pos = [], 0
        for lid, probe in live.items():
            assert probe.max is not None
            c = probe.max.numel()
            sat, total, cvar, forwards = (float(v) for v in host[pos + c : pos + c + 4])
            name = self.index[lid].display_name
            has_saturation = probe.saturation is not None
            states.append(
                ProbeEpoch(
                    lid,
                    name,
                    host[pos : pos + c],
                    sat,
                    total,
                    cvar,
                    forwards,
                    probe.threshold,
                    probe.dead,
                    has_saturation,
                )
            )
            pos += c + 4
            if forwards:
                self.last_max[lid] = probe.max.detach().clone()
                probe.reset()
        store_activation_epoch(self.writer, states, step, epoch)

    def check_dims(self, shapes: dict[int, list[int]]) -> None:
        """Refuse a channel dim outside a watched layer's output (shapes from ``input_size``)."""
        for lid, probe in self.probes.items():
            shape = shapes.get(lid)
            if shape is not None and not -len(shape) <= probe.dim < len(shape):
                raise ValueError(
                    f"channel_dim={probe.dim} is out of range for layer [{lid}] "
                    f"{self.index[lid].display_name}, "
                    f"whose output has shape {shape}; pass channel_dim in {-len(shape)}..{len(shape) - 1} "
                    "or None (chosen per layer)"
                )

    def warn_unseen(self) -> None:
        """Once: warn when no watched layer recorded anything although the model trained."""
        if self.checked or not self.probes:
            return
        self.checked = True
        if self.forwards_seen() == 0:
            warnings.warn(
                "the activation hooks recorded nothing during this step: the forward ran without them. "
                "A torch.compile'd model of the same class compiled before the hooks were registered "
                "reuses its old graph; create the Analyzer before the first call of the compiled model "
                "(or call torch._dynamo.reset()). Also check channel_dim and that forwards run in "
                "train mode.",
                RuntimeWarning,
                stacklevel=4,
            )

    def channel_max(self, layer_id: int) -> torch.Tensor | None:
        """Per-channel maximum of the current epoch, else of the last finished one, else ``None``."""
        probe = self.probes[layer_id]
        if probe.max is not None and probe.forwards is not None and float(probe.forwards) > 0:
            return probe.max
        return self.last_max.get(layer_id)

    def dead_by_id(self, threshold: float | None) -> dict[int, list[int]]:
        """``{layer_id: dead channel indices}`` of the probes that count dead units; raises when no
        activation was seen yet."""
        out = {}
        seen = False
        for lid, probe in self.probes.items():
            cmax = self.channel_max(lid)
            if cmax is None:
                continue
            seen = True
            if not probe.dead:
                continue
            thr = probe.threshold if threshold is None else threshold
            out[lid] = torch.nonzero(cmax <= thr).flatten().tolist()
        if not seen:
            raise RuntimeError(
                "no activation data: call watch_activations(...) (or Analyzer(..., activations=True)) and "
                "run forward passes in training mode first"
            )
        return out
