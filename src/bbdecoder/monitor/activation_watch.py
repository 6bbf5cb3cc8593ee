"""ActivationWatcher: the forward hooks that feed :class:`ActivationProbe` objects, and the
per-epoch rows they produce in the run store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.layers import LayerIndex, LayerInfo
from bbdecoder.monitor.activations import ActivationProbe
from bbdecoder.store.writer import RunWriter

ACTIVATION_STATS = ("dead_fraction", "dead_count", "saturated_fraction", "channel_var")


class ActivationWatcher:
    """Watches layer outputs in training-mode forwards (never while ``paused`` is true)."""

    def __init__(self, index: LayerIndex, writer: RunWriter, hooks: HookManager) -> None:
        self.index = index
        self.writer = writer
        self.hooks = hooks
        self.probes: dict[int, ActivationProbe] = {}
        self.last_max: dict[int, torch.Tensor] = {}
        self.paused = False

    def watch(self, layers: list[LayerInfo], threshold: float, eps: float, dim: int) -> None:
        for layer in layers:
            if layer.id in self.probes:
                continue
            probe = ActivationProbe(layer.module, threshold, eps, dim)
            self.probes[layer.id] = probe
            self.writer.series_id(layer.id, "")
            self.hooks.forward_hook(layer.module, self._hook(probe))

    def _hook(self, probe: ActivationProbe) -> Callable[..., None]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if self.paused or not module.training:
                return
            if isinstance(output, torch.Tensor):
                out: torch.Tensor | None = output
            else:
                out = next((o for o in output if isinstance(o, torch.Tensor)), None)
            if out is not None and out.dim() >= 1:
                with torch.no_grad():
                    probe.update(out)

        return hook

    def record(self, step: int, epoch: int) -> None:
        """Buffer this epoch's activation statistics (one host copy for all layers) and reset."""
        live = {lid: pr for lid, pr in self.probes.items() if pr.max is not None}
        if not live:
            return
        parts = []
        for probe in live.values():
            dead = probe.dead_mask()
            assert dead is not None and probe.channel_var is not None
            sat = probe.saturated.double() if probe.saturated is not None else torch.tensor(float("nan"))
            parts.append(dead.double())
            parts.append(torch.stack([sat.to(dead.device), probe.channel_var.double()]))
        host = torch.cat(parts).cpu().numpy()
        ids = {name: self.writer.stat_id(name) for name in ACTIVATION_STATS}
        rows = []
        pos = 0
        for lid, probe in live.items():
            assert probe.max is not None
            c = probe.max.numel()
            dead_host = host[pos : pos + c] > 0.5
            sat, cvar = host[pos + c], host[pos + c + 1]
            pos += c + 2
            sid = self.writer.series_id(lid, "")
            sat_frac = sat / probe.total if probe.total else float("nan")
            for name, value in (
                ("dead_fraction", dead_host.mean()),
                ("dead_count", dead_host.sum()),
                ("saturated_fraction", sat_frac),
                ("channel_var", cvar / probe.forwards),
            ):
                rows.append((step, epoch, sid, ids[name], float(value)))
            if dead_host.any():
                where = f"[{lid}] {self.index[lid].display_name}"
                self.writer.add_event(
                    "dead_units",
                    f"{int(dead_host.sum())} of {c} units dead in {where}",
                    step=step,
                    epoch=epoch,
                    layer_id=lid,
                    data={"channels": np.flatnonzero(dead_host).tolist()},
                )
            self.last_max[lid] = probe.max.detach().clone()
            probe.reset()
        self.writer.add_scalars(rows)

    def channel_max(self, layer_id: int) -> torch.Tensor | None:
        """Per-channel maximum of the current epoch, else of the last finished one, else ``None``."""
        probe = self.probes[layer_id]
        return probe.max if probe.max is not None else self.last_max.get(layer_id)

    def dead_by_id(self, threshold: float | None) -> dict[int, list[int]]:
        """``{layer_id: dead channel indices}``; raises when no activation was seen yet."""
        out = {}
        for lid, probe in self.probes.items():
            cmax = self.channel_max(lid)
            if cmax is None:
                continue
            thr = probe.threshold if threshold is None else threshold
            out[lid] = torch.nonzero(cmax <= thr).flatten().tolist()
        if not out:
            raise RuntimeError(
                "no activation data: call watch_activations(...) (or Analyzer(..., activations=True)) and "
                "run forward passes in training mode first"
            )
        return out
