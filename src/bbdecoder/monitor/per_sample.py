"""Per-sample gradient statistics without one backward per sample.

Contract (DESIGN.md section 6). The batch loss is ``L = (1/B) sum_i l_i`` over the ``B`` samples
of the step (``loss_reduction="mean"``, the default) or ``L = sum_i l_i`` (``"sum"``); ``g_i`` is
the gradient of the per-sample loss ``l_i`` and ``G = (1/B) sum_i g_i``. The hooks see gradients
of ``L``: sample ``i``'s share of them is ``g_i / B`` under ``"mean"`` (rescaled by ``B`` here)
and ``g_i`` under ``"sum"``. Per parameter tensor:

- ``sample_norm_mean`` = ``(1/B) sum_i ||g_i||``,
- ``sample_var`` = ``(1/B) sum_i ||g_i - G||^2``, the trace of the across-sample (population)
  covariance, computed as ``(1/B) sum_i ||g_i||^2 - ||G||^2`` in float64 from per-sample squared
  norms in the parameter's dtype (relative error about ``eps * mean_i ||g_i||^2 / sample_var``),
- ``sample_grad_sq`` = ``||G||^2``.

Samples are the entries of dim 0 of each layer's input (batch-first). Several forward passes of
the model before one step (gradient accumulation) are several groups of samples: ``B`` counts
them all, and a module called twice in one pass (shared weights) adds both calls into one ``g_i``.

How each layer is handled (:mod:`bbdecoder.monitor.per_sample_rules`): ``nn.Linear`` (any
``(N, ..., D)`` input) and ``nn.Conv1d``/``nn.Conv2d`` (stride, padding and its modes, dilation,
groups) from the layer's input and output gradient; ``nn.Embedding`` by scattering the output
gradients to the ids; biases by summing the output gradients; every other module that owns
parameters (LayerNorm, a container's ``cls_token``, ...) by ``torch.func`` (``vmap`` of a ``vjp``
of the module's own forward). Exact in every case.

Refused: models with BatchNorm in training mode (:class:`PerSampleError`): the batch statistics
make every sample's loss depend on every other sample, so per-sample gradients are undefined
(put the BatchNorm layers in eval mode, use GroupNorm/LayerNorm, or turn ``per_sample`` off).
Layers that cannot be handled exactly (a module whose forward draws random numbers, an
``Embedding`` with ``scale_grad_by_freq``) are left out with a warning naming them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bbdecoder.hooks import HookManager
from bbdecoder.monitor.per_sample_rules import Representation, UnsupportedLayer, apply_rule, combine

LOSS_REDUCTIONS = ("mean", "sum")


class PerSampleError(ValueError):
    """Per-sample gradients are undefined or cannot be computed for this model or step."""


@dataclass
class _Call:
    pass_id: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad: torch.Tensor | None = None


@dataclass
class PerSampleStats:
    """One step's per-sample statistics (float64 tensors on the parameters' device).

    ``table`` is ``(n, 3)``: per parameter tensor (in the order of ``names``) ``sample_norm_mean``,
    ``sample_var``, ``sample_grad_sq`` (see the module docstring). ``sample_sq_norms`` is ``(B,)``:
    ``||g_i||^2`` over the whole model (all tensors in ``names`` together).
    """

    names: list[str]
    table: torch.Tensor
    sample_sq_norms: torch.Tensor
    skipped: dict[str, str] = field(default_factory=dict)
    sums: torch.Tensor | None = None
    """``(n, 2)``: per tensor ``sum_i ||g_i||`` and ``sum_i ||g_i||^2`` (what merges across ranks)."""
    grad_sums: list[torch.Tensor] = field(default_factory=list)
    """Per tensor ``sum_i g_i`` (float64, the parameter's full shape)."""
    merged: tuple[int, float] | None = None
    """Set on statistics merged across ranks (:mod:`bbdecoder.monitor.per_sample_merge`): the global
    batch size and the whole model's ``mean_i ||g_i||``; ``sample_sq_norms`` is then this rank's."""

    @property
    def batch_size(self) -> int:
        return self.merged[0] if self.merged is not None else int(self.sample_sq_norms.numel())

    def model_row(self) -> torch.Tensor:
        """``(3,)``: the whole model's ``sample_norm_mean``, ``sample_var``, ``sample_grad_sq``."""
        norm_mean = (
            self.table.new_tensor(self.merged[1])
            if self.merged is not None
            else self.sample_sq_norms.sqrt().mean()
        )
        return torch.stack([norm_mean, self.table[:, 1].sum(), self.table[:, 2].sum()])


def batchnorm_in_training(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules of ``model`` that are in training mode."""
    return [name or "(root)" for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]


def refuse_batchnorm(model: nn.Module) -> None:
    """Raise :class:`PerSampleError` when ``model`` has a BatchNorm layer in training mode."""
    names = batchnorm_in_training(model)
    if names:
        raise PerSampleError(
            f"per-sample gradients are undefined with BatchNorm in training mode ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): batch statistics make each sample's loss depend on "
            "the whole batch. Put those layers in eval mode (module.eval()), use GroupNorm or LayerNorm, "
            "or turn per_sample off"
        )


class PerSampleGradients:
    """Capture layer inputs and output gradients during :meth:`armed` passes and reduce them to
    :class:`PerSampleStats`.

    Args:
        model: the model (never modified; hooks are removed by :meth:`close`).
        params: ``(state_dict name, parameter)`` pairs to cover (``None``: every parameter that
            requires grad, by ``named_parameters()`` names).
        loss_reduction: ``"mean"`` (the batch loss is the mean of the per-sample losses) or ``"sum"``.
        hooks: register hooks through this manager (e.g. the Analyzer's), else an own one.
        pause: a context-manager factory entered while layers are re-run by ``torch.func``, so
            other observers (activation probes) do not record those runs.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[tuple[str, torch.Tensor]] | None = None,
        *,
        loss_reduction: str = "mean",
        hooks: HookManager | None = None,
        pause: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        refuse_batchnorm(model)
        self.model = model
        self.loss_reduction = loss_reduction
        self._pause = pause
        if params is None:
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in params]
        by_id = {id(p): i for i, (_, p) in enumerate(params)}
        # param row -> [(module, local name)], every module that owns it (tied weights: several)
        self._owners: dict[int, list[tuple[nn.Module, str]]] = {i: [] for i in range(len(params))}
        self._modules: dict[int, tuple[nn.Module, list[str]]] = {}
        for module in model.modules():
            for local, p in module.named_parameters(recurse=False):
                row = by_id.get(id(p))
                if row is None or not p.requires_grad:
                    continue
                self._owners[row].append((module, local))
                self._modules.setdefault(id(module), (module, []))[1].append(local)
        self._hooks = hooks if hooks is not None else HookManager()
        self._own_hooks = hooks is None
        self._calls: dict[int, list[_Call]] = {key: [] for key in self._modules}
        self._armed = False
        self._computing = False
        self._pass = 0
        self._warned: set[str] = set()
        self._hooks.forward_pre_hook(model, self._root_pre_hook)
        for key, (module, _) in self._modules.items():
            self._hooks.forward_hook(module, self._capture(key), with_kwargs=True)

    # -- capture ------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """Whether forward passes are being captured."""
        return self._armed

    def arm(self, on: bool = True) -> None:
        """Start (or stop) capturing; starting drops anything captured before."""
        if on:
            refuse_batchnorm(self.model)
            self._reset()
        self._armed = on

    def _reset(self) -> None:
        for calls in self._calls.values():
            calls.clear()
        self._pass = 0

    def _root_pre_hook(self, _module: nn.Module, _args: Any) -> None:
        if self._armed and not self._computing and torch.is_grad_enabled():
            refuse_batchnorm(self.model)
            self._pass += 1

    def _capture(self, key: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not self._armed or self._computing or not torch.is_grad_enabled():
                return
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            call = _Call(
                self._pass, tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}
            )
            self._calls[key].append(call)

            def grad_hook(grad: torch.Tensor) -> None:
                call.grad = grad.detach() if call.grad is None else call.grad + grad.detach()

            out.register_hook(grad_hook)  # dies with the graph; nothing to remove

        return hook

    # -- reduction ----------------------------------------------------------------------------
    def compute(self) -> PerSampleStats:
        """Reduce what was captured since :meth:`arm` (after ``backward``) and drop it.

        Raises :class:`PerSampleError` when no captured call has a gradient."""
        self._computing = True
        try:
            with self._pause() if self._pause is not None else contextlib.nullcontext():
                return self._compute()
        finally:
            self._computing = False
            self._reset()

    def _compute(self) -> PerSampleStats:
        reps: dict[int, list[tuple[int, dict[str, Representation]]]] = {}
        batch: dict[int, int] = {}
        skipped: dict[str, str] = {}
        failed: set[int] = set()
        for key, (module, locals_) in self._modules.items():
            done = []
            try:
                for call in self._calls[key]:
                    if call.grad is None:
                        continue
                    size = call.grad.shape[0] if call.grad.dim() else 0
                    if batch.setdefault(call.pass_id, size) != size:
                        raise UnsupportedLayer(
                            f"its output has {size} samples in a pass where other layers have "
                            f"{batch[call.pass_id]} (is dim 0 the batch?)"
                        )
                    done.append(
                        (call.pass_id, apply_rule(module, call.args, call.kwargs, call.grad, locals_))
                    )
            except UnsupportedLayer as err:
                for local in locals_:
                    skipped[f"{type(module).__name__}.{local}"] = str(err)
                failed.add(key)
                continue
            reps[key] = done
        if not batch:
            raise PerSampleError(
                "no per-sample data was captured for this step: run the forward pass (in grad mode) "
                "and the backward pass after the step was armed"
            )
        passes = sorted(batch)
        total = sum(batch[p] for p in passes)
        scale = float(total) if self.loss_reduction == "mean" else 1.0
        rows, sq_all, names = [], None, []
        sums: list[torch.Tensor] = []
        grad_sums: list[torch.Tensor] = []
        for row, owners in self._owners.items():
            if any(id(module) in failed for module, _ in owners):
                continue
            per_pass: dict[int, list[Representation]] = {}
            for module, local in owners:
                for pass_id, found in reps.get(id(module), []):
                    if local in found:
                        per_pass.setdefault(pass_id, []).append(found[local])
            if not per_pass:
                continue
            sq_parts: list[torch.Tensor | None] = []
            grad_sum: torch.Tensor | None = None
            for pass_id in passes:
                if pass_id not in per_pass:
                    sq_parts.append(None)
                    continue
                sq, summed = combine(per_pass[pass_id]).reduce()
                sq_parts.append(sq.double())
                grad_sum = summed.double() if grad_sum is None else grad_sum + summed.double()
            assert grad_sum is not None
            ref = next(s for s in sq_parts if s is not None)
            sq = torch.cat(
                [
                    s if s is not None else ref.new_zeros(batch[p])
                    for s, p in zip(sq_parts, passes, strict=True)
                ]
            ) * (scale * scale)
            mean_grad_sq = (grad_sum * (scale / total)).pow(2).sum()
            var = (sq.mean() - mean_grad_sq).clamp_min(0.0)
            rows.append(torch.stack([sq.sqrt().mean(), var, mean_grad_sq]))
            sums.append(torch.stack([sq.sqrt().sum(), sq.sum()]))
            grad_sums.append(grad_sum * scale)
            sq_all = sq if sq_all is None else sq_all + sq
            names.append(self.names[row])
        for what, why in skipped.items():
            if what not in self._warned:
                self._warned.add(what)
                warnings.warn(f"per-sample statistics leave out {what}: {why}", RuntimeWarning, stacklevel=3)
        if sq_all is None:
            raise PerSampleError("none of the covered parameters got per-sample gradients in this step")
        return PerSampleStats(names, torch.stack(rows), sq_all, skipped, torch.stack(sums), grad_sums)

    def close(self) -> None:
        """Remove the hooks (when this object registered them itself) and drop captured data."""
        self._armed = False
        self._reset()
        if self._own_hooks:
            self._hooks.remove_all()

    def __enter__(self) -> PerSampleGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def capture(model: nn.Module, **kwargs: Any) -> Iterator[PerSampleGradients]:
    """``with capture(model) as ps: loss = ...; loss.backward(); stats = ps.compute()``."""
    grads = PerSampleGradients(model, **kwargs)
    grads.arm()
    try:
        yield grads
    finally:
        grads.close()


__all__ = [
    "PerSampleError",
    "PerSampleGradients",
    "PerSampleStats",
    "batchnorm_in_training",
    "capture",
    "refuse_batchnorm",
]
