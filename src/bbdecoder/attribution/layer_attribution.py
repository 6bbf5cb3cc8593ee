"""Attribution at a layer's output (Captum's ``Layer*`` methods), for token models above all.

``layer=`` (a module, a qualified name or a glob matching one module) names where to attribute; with
integer inputs (token ids) and no layer, the model's input embeddings (``get_input_embeddings()``) are
used. One forward hook on that layer *returns a replacement* for its output (the technique of Captum's
``LayerIntegratedGradients``): the model runs on the real inputs (ids, attention mask, ...), and at the
layer

* Gradient / Input x Gradient: the output is swapped for a detached leaf copy that requires grad, so one
  forward+backward gives ``dF/dA`` (and ``A * dF/dA``);
* Integrated Gradients: each row (sample x step, step-major, chunked by ``internal_batch_size``) gets
  ``A' + alpha (A - A')`` with the nodes and weights of :mod:`bbdecoder.attribution.quadrature`, and
  the attribution is ``(A - A') * sum_s w_s dF/dA(A' + alpha_s (A - A'))``;
* SmoothGrad: the noise is added at the layer (embedding space), ``sigma`` from each sample's range of
  ``A``, and the inner method is applied at the noisy ``A``.

A layer with a tuple output (a transformer block) has its first tensor replaced. Only the layer's
output changes; the model's modules, parameters, modes and hooks are as they were afterwards.
Positions where ``attention_mask == 0`` (padding) get exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bbdecoder.attribution.outputs import model_output
from bbdecoder.attribution.path_chunks import add_weighted, path_chunks
from bbdecoder.attribution.quadrature import check_quadrature
from bbdecoder.attribution.token_inputs import (
    KeywordCall,
    ModelInputs,
    TokenBatch,
    baseline_ids,
    freeze_token_target,
    layer_baseline_value,
    row_scores,
)
from bbdecoder.hooks import HookManager
from bbdecoder.layers import find_modules
from bbdecoder.targets import TargetError, TargetLike
from bbdecoder.validation import check_positive_int

if TYPE_CHECKING:
    from bbdecoder.attribution.base import Explainer

LayerSpec = nn.Module | str | int | None
TOKEN_OPTIONS = ("pad_token_id", "mask_token_id", "position", "layer_values")


class LayerCallError(RuntimeError):
    """The chosen layer ran more than once in one forward pass (its output is ambiguous)."""


# -- which layer ------------------------------------------------------------------------------------
def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` when the model has it (Hugging Face models), else ``None``."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        module = getter()
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Module) else None


def eager_model(model: nn.Module) -> nn.Module:
    """The eager module under ``torch.compile`` (hooks added after compilation are not seen by the
    compiled graph; the eager modules have the same weights and outputs), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def resolve_layer(model: nn.Module, layer: LayerSpec) -> tuple[str, nn.Module]:
    """The one ``(qualified name, module)`` that ``layer`` names; ``None``: the input embeddings."""
    model = eager_model(model)
    if layer is None:
        module = input_embeddings(model)
        if module is None:
            raise TypeError(
                f"the inputs are integers (token ids?), and gradients need floating point; "
                f"{type(model).__name__} has no get_input_embeddings() to attribute at instead. Pass "
                "layer= the embedding module (the module or its name, e.g. Gradient(model, layer='embed')), "
                "or, if the inputs are numbers rather than ids, use .float()"
            )
        layer = module
    found = find_modules(model, layer)
    if len(found) != 1:
        names = ", ".join(repr(name) for name, _ in found[:6])
        raise ValueError(
            f"layer={layer!r} matches {len(found)} modules ({names}{', ...' if len(found) > 6 else ''}); "
            "attribution needs exactly one: give its full qualified name"
        )
    return found[0]


def uses_layer(explainer: Explainer, inputs: Any) -> bool:
    """Whether ``attribute`` goes through a layer: a ``layer=`` was given, or the inputs are a dict or ids."""
    if getattr(explainer, "attribution_layer", None) is not None or isinstance(inputs, Mapping):
        return True
    return isinstance(inputs, torch.Tensor) and not inputs.dtype.is_floating_point


# -- the hook ---------------------------------------------------------------------------------------
class LayerSwap:
    """A forward hook that captures, or replaces, the first tensor of one module's output."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.mode = "capture"
        self.value: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.calls = 0

    def prepare(self, mode: str, value: torch.Tensor | None = None) -> None:
        """``"capture"`` (record, change nothing), ``"leaf"`` (a leaf copy) or ``"replace"`` (``value``)."""
        self.mode, self.value, self.seen, self.calls = mode, value, None, 0

    def take(self) -> torch.Tensor:
        if self.seen is None:
            raise RuntimeError(
                f"the layer {self.name!r} did not run in the forward pass; choose a layer the model uses"
            )
        return self.seen

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise LayerCallError(
                f"the layer {self.name!r} ran {self.calls} times in one forward pass, so its output is "
                "ambiguous; attribute at a module that runs once (e.g. the embedding, not a shared block)"
            )
        tensor, rebuild = _first_tensor(output, self.name)
        if self.mode == "capture":
            self.seen = tensor.detach()
            return None
        if self.mode == "leaf":
            new = tensor.detach().clone().requires_grad_(True)
        else:
            assert self.value is not None
            if self.value.shape != tensor.shape:
                raise ValueError(
                    f"the value for layer {self.name!r} has shape {tuple(self.value.shape)}, but the layer "
                    f"returned {tuple(tensor.shape)}"
                )
            new = self.value
        self.seen = new
        return rebuild(new)


def _first_tensor(output: Any, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        rest = list(output[1:])
        kind = type(output)
        return output[0], lambda new: kind([new, *rest]) if kind in (tuple, list) else kind(new, *rest)
    raise TypeError(
        f"the layer {name!r} returns a {type(output).__name__}; layer attribution needs a tensor output "
        "(or a tuple whose first entry is one)"
    )


# -- the engine -------------------------------------------------------------------------------------
class LayerRun:
    """One explainer's calls at one layer: the model run on row subsets with the layer captured or swapped."""

    def __init__(self, explainer: Explainer, inputs: ModelInputs, hooks: HookManager) -> None:
        self.explainer = explainer
        self.batch = TokenBatch(inputs)
        self.name, self.module = resolve_layer(explainer.model, getattr(explainer, "attribution_layer", None))
        self.swap = LayerSwap(self.name, self.module)
        hooks.forward_hook(self.module, self.swap)
        self.caller = KeywordCall(eager_model(explainer.model))

    def forward(self, inputs: ModelInputs) -> Any:
        transform = self.explainer.input_transform
        if transform is not None and isinstance(inputs, torch.Tensor) and inputs.dtype.is_floating_point:
            inputs = transform(inputs)
        return model_output(self.caller, inputs, self.explainer.scores_from)

    def positions(self, position: int | torch.Tensor) -> torch.Tensor:
        return self.batch.positions(position)

    def capture(self, inputs: ModelInputs) -> tuple[torch.Tensor, Any]:
        """The layer's output and the model's output, without gradients."""
        self.swap.prepare("capture")
        with torch.no_grad():
            output = self.forward(inputs)
        return self.swap.take(), output

    def gradient_at(
        self, inputs: ModelInputs, value: torch.Tensor | None, score: Callable[[Any], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``dScore/dA`` with the layer's output ``A`` replaced by ``value`` (``None``: its own output).

        Returns the gradient, ``A`` (detached) and the model output (detached graph).
        """
        if value is None:
            self.swap.prepare("leaf")
        else:
            self.swap.prepare("replace", value.detach().requires_grad_(True))
        output = self.forward(inputs)
        leaf = self.swap.take()
        scores = score(output)
        (grad,) = torch.autograd.grad(scores.sum(), leaf)
        return grad, leaf.detach(), output

    def rows_per_pass(self, internal_batch_size: int | None, budget: int | None) -> int:
        if internal_batch_size is not None:
            check_positive_int(internal_batch_size, "internal_batch_size")
            return internal_batch_size
        # memory imports the explainer base, which imports this module: import it when first used.
        from bbdecoder.attribution.memory import (
            CPU_PASS_TARGET_BYTES,
            GRAD_MEMORY_FACTOR,
            default_memory_budget,
            tensor_bytes,
        )

        one = self.batch.rows(torch.zeros(1, dtype=torch.long))
        total = [tensor_bytes(one)]

        def count(_module: nn.Module, _args: Any, output: Any) -> None:
            total[0] += tensor_bytes(output)

        model = eager_model(self.explainer.model)
        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        with HookManager() as probe, torch.no_grad():
            for leaf in leaves:
                probe.forward_hook(leaf, count)
            self.swap.prepare("capture")
            self.forward(one)
        per_row = max(1, int(total[0] * GRAD_MEMORY_FACTOR))
        budget = budget or default_memory_budget(self.batch.device)
        rows = max(1, budget // per_row)
        if self.batch.device.type == "cpu":
            rows = min(rows, max(1, math.ceil(CPU_PASS_TARGET_BYTES / max(1, total[0]))))
        return int(rows)


def _options(
    kwargs: dict[str, Any],
) -> tuple[int | None, int | None, int | torch.Tensor, torch.Tensor | None]:
    unknown = sorted(set(kwargs) - set(TOKEN_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)} for layer attribution; "
            f"accepted: {', '.join(TOKEN_OPTIONS)}"
        )
    return (
        kwargs.get("pad_token_id"),
        kwargs.get("mask_token_id"),
        kwargs.get("position", -1),
        kwargs.get("layer_values"),
    )


def layer_gradient(
    explainer: Explainer, inputs: ModelInputs, target: TargetLike, *, times_activation: bool, **kwargs: Any
) -> torch.Tensor:
    """``dF/dA`` (or ``A * dF/dA``) at the layer's output ``A``, shaped like ``A`` (``(N, L, D)``)."""
    _, _, position, values = _options(kwargs)
    with explainer.session() as hooks:
        run = LayerRun(explainer, inputs, hooks)
        positions = run.positions(position)
        sample = torch.arange(run.batch.n, device=positions.device)

        def score(output: Any) -> torch.Tensor:
            # One pass: None is the arg-max of this very output.
            classes = freeze_token_target(output, target, run.batch, positions)
            return row_scores(output, classes, sample, positions)

        grad, value, _ = run.gradient_at(inputs, values, score)
    result = grad * value if times_activation else grad
    return run.batch.mask_padding(result)


def layer_integrated_gradients(
    explainer: Explainer,
    inputs: ModelInputs,
    target: TargetLike,
    baseline: Any,
    n_steps: int,
    method: str,
    internal_batch_size: int | None,
    return_convergence_delta: bool,
    memory_budget_bytes: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated Gradients at the layer's output; see the module docstring. Shaped like the output."""
    pad_id, mask_id, position, values = _options(kwargs)
    n_steps = check_quadrature(method, n_steps)
    with explainer.session() as hooks:
        run = LayerRun(explainer, inputs, hooks)
        batch = run.batch
        n = batch.n
        rows_per_pass = run.rows_per_pass(internal_batch_size, memory_budget_bytes)
        positions = run.positions(position)
        # The layer's output and the model's scores on the inputs, in passes of at most rows_per_pass.
        clean, outputs = _capture_chunks(run, batch, rows_per_pass)
        x_layer = clean if values is None else values.detach().to(clean)
        frozen = _freeze_chunks(outputs, target, batch, positions)
        ids = baseline_ids(baseline, batch, explainer.model, pad_token_id=pad_id, mask_token_id=mask_id)
        pixels = _input_space_baseline(baseline, batch)
        if ids is not None or pixels is not None:
            base_inputs = batch.with_ids(ids) if ids is not None else pixels
            assert base_inputs is not None
            base_batch = TokenBatch(base_inputs)
            base_layer, _ = _capture_chunks(run, base_batch, rows_per_pass)
        else:
            base_layer = layer_baseline_value(baseline, x_layer)
        diff = x_layer - base_layer
        accumulated = torch.zeros_like(x_layer)
        for chunk in path_chunks(base_layer, diff, method, n_steps, rows_per_pass):
            row_sample = chunk.sample.to(positions.device)

            def score(output: Any, rows: torch.Tensor = row_sample) -> torch.Tensor:
                return row_scores(output, frozen, rows, positions)

            grad, _, _ = run.gradient_at(batch.rows(chunk.sample), chunk.path, score)
            add_weighted(accumulated, grad, chunk)
        attribution = batch.mask_padding(diff * accumulated)
        if not return_convergence_delta:
            return attribution
        scores_x = _scores_at(run, batch, x_layer, frozen, positions, rows_per_pass)
        scores_base = _scores_at(run, batch, base_layer, frozen, positions, rows_per_pass)
    delta = attribution.reshape(n, -1).sum(dim=1) - (scores_x - scores_base).to(attribution.dtype)
    return attribution, delta


def _input_space_baseline(baseline: Any, batch: TokenBatch) -> torch.Tensor | None:
    """For a float tensor input, the baseline in input space (as Captum's ``Layer*`` take it)."""
    inputs = batch.inputs
    if not isinstance(inputs, torch.Tensor) or not inputs.dtype.is_floating_point:
        return None
    if isinstance(baseline, str) and baseline == "zero":
        return None
    from bbdecoder.attribution.baselines import make_baseline

    return make_baseline(baseline, inputs)


def _capture_chunks(run: LayerRun, batch: TokenBatch, rows: int) -> tuple[torch.Tensor, list[Any]]:
    layers: list[torch.Tensor] = []
    outputs: list[Any] = []
    for start in range(0, batch.n, rows):
        index = torch.arange(start, min(start + rows, batch.n))
        layer, output = run.capture(batch.rows(index))
        layers.append(layer)
        outputs.append((index, output))
    return torch.cat(layers), outputs


def _freeze_chunks(
    outputs: list[Any], target: TargetLike, batch: TokenBatch, positions: torch.Tensor
) -> TargetLike:
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    if target is not None:
        classes = torch.as_tensor(target) if not isinstance(target, int) else None
        if classes is not None and classes.dim() == 1 and classes.shape[0] != batch.n:
            raise TargetError(
                f"got {classes.numel()} targets for a batch of {batch.n}; give one class per sample, a "
                "single int, or None for the arg-max"
            )
    frozen: list[torch.Tensor] = []
    for index, output in outputs:
        part = TokenBatch(batch.rows(index))
        chunk_target = target
        if isinstance(target, (list, tuple)) or (isinstance(target, torch.Tensor) and target.dim() == 1):
            chunk_target = torch.as_tensor(target)[index]
        chunk_classes = freeze_token_target(output, chunk_target, part, positions[index.to(positions.device)])
        assert isinstance(chunk_classes, torch.Tensor)
        frozen.append(chunk_classes)
    return torch.cat(frozen)


def _scores_at(
    run: LayerRun,
    batch: TokenBatch,
    value: torch.Tensor,
    target: TargetLike,
    positions: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """The scores (N,) with the layer's output set to ``value``, without gradients."""
    scores = []
    for start in range(0, batch.n, rows):
        index = torch.arange(start, min(start + rows, batch.n), device=value.device)
        run.swap.prepare("replace", value[index])
        with torch.no_grad():
            output = run.forward(batch.rows(index))
        scores.append(row_scores(output, target, index.to(positions.device), positions))
    return torch.cat(scores)


def layer_smoothgrad(
    smoother: Any,
    explain: Callable[..., Any],
    inputs: ModelInputs,
    target: TargetLike,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """SmoothGrad with the noise added at the inner explainer's layer (embedding space)."""
    inner = smoother.explainer
    position = kwargs.get("position", -1)
    with inner.session() as hooks:
        run = LayerRun(inner, inputs, hooks)
        clean, output = run.capture(inputs)
        positions = run.positions(position)
        frozen = freeze_token_target(output, target, run.batch, positions)
        rows = run.rows_per_pass(smoother.internal_batch_size, None) if inner.eval_mode else 0
    batch = run.batch
    n = batch.n
    draw = smoother._noise_source(clean)
    # Train-mode modules (BatchNorm, dropout) would mix the copies: one copy per call then.
    copies_per_call = max(1, min(smoother.n_samples, rows // n))
    from bbdecoder.attribution.smoothgrad import _Reduction, _repeat_target

    reduction = _Reduction(smoother.kind)
    done = 0
    while done < smoother.n_samples:
        copies = min(copies_per_call, smoother.n_samples - done)
        noisy = torch.cat([draw() for _ in range(copies)])
        index = torch.arange(n).repeat(copies)
        rep_target = _repeat_target(frozen, copies)
        options = dict(kwargs)
        if isinstance(position, torch.Tensor):
            options["position"] = position.repeat(copies)
        result = explain(batch.rows(index), rep_target, layer_values=noisy, **options)
        if not isinstance(result, torch.Tensor):
            raise TypeError("SmoothGrad needs one tensor from the inner explainer")
        for copy in result.detach().split(n):
            reduction.add(copy)
        done += copies
    return batch.mask_padding(reduction.result())


def layer_gradient_shap(
    explainer: Any,
    inputs: ModelInputs,
    target: TargetLike,
    baselines: Any,
    n_samples: int,
    stdevs: float,
    internal_batch_size: int | None,
    **kwargs: Any,
) -> torch.Tensor:
    """GradientSHAP at the layer's output: expected ``(A + eps - B) * dF/dA(B + alpha (A + eps - B))``.

    ``baselines``: ``"pad"``, ``"mask"`` or ``"zero"`` (one reference), integer ids ``(B, L)`` (a set of
    ``B`` reference sequences, each run with every sample's other inputs) or a float tensor
    ``(B, *layer_output_sample_shape)`` (a set of references at the layer). The noise ``eps`` has
    standard deviation ``stdevs`` at the layer. Draws are those of the input-space
    :class:`~bbdecoder.attribution.gradient_shap.GradientSHAP`
    (:class:`~bbdecoder.attribution.gradient_shap.SharedDraws`, seeded with its seed): draw ``j`` is
    the same for every sample, so a batch equals its rows one by one.
    """
    pad_id, mask_id, position, values = _options(kwargs)
    check_positive_int(n_samples, "n_samples")
    if not stdevs >= 0:
        raise ValueError(f"stdevs must be >= 0, got {stdevs}")
    with explainer.session() as hooks:
        run = LayerRun(explainer, inputs, hooks)
        batch = run.batch
        n = batch.n
        rows_per_pass = run.rows_per_pass(
            internal_batch_size, getattr(explainer, "memory_budget_bytes", None)
        )
        positions = run.positions(position)
        clean, outputs = _capture_chunks(run, batch, rows_per_pass)
        x_layer = clean if values is None else values.detach().to(clean)
        frozen = _freeze_chunks(outputs, target, batch, positions)
        references = _reference_set(run, baselines, x_layer, rows_per_pass, pad_id, mask_id)
        from bbdecoder.attribution.gradient_shap import SharedDraws

        draws = SharedDraws(explainer.seed, references.shape[0], n_samples, tuple(x_layer.shape[1:]))
        total_rows = n * n_samples
        accumulated = torch.zeros_like(x_layer, dtype=torch.float64)
        broadcast = (-1,) + (1,) * (x_layer.dim() - 1)
        for start in range(0, total_rows, rows_per_pass):
            stop = min(start + rows_per_pass, total_rows)
            sample = (torch.arange(start, stop) % n).to(x_layer.device)
            draw = torch.arange(start, stop) // n
            noisy = x_layer[sample]
            if stdevs > 0:
                noisy = noisy + (stdevs * draws.noise(draw)).to(noisy)
            base = references[draws.choice[draw].to(x_layer.device), sample]
            alpha = draws.alphas[draw].to(noisy).view(broadcast)
            with torch.no_grad():
                point = base + alpha * (noisy - base)

            row_sample = sample.to(positions.device)

            def score(output: Any, rows: torch.Tensor = row_sample) -> torch.Tensor:
                return row_scores(output, frozen, rows, positions)

            grad, _, _ = run.gradient_at(batch.rows(sample), point, score)
            accumulated.index_add_(0, sample, ((noisy - base) * grad).to(torch.float64))
    return batch.mask_padding((accumulated / n_samples).to(x_layer.dtype))


def _reference_set(
    run: LayerRun,
    baselines: Any,
    x_layer: torch.Tensor,
    rows: int,
    pad_id: int | None,
    mask_id: int | None,
) -> torch.Tensor:
    """Layer-space references ``(B, N, *layer_sample_shape)``: reference ``j`` for sample ``i``."""
    batch = run.batch
    if isinstance(baselines, torch.Tensor) and baselines.dtype.is_floating_point:
        if tuple(baselines.shape[1:]) != tuple(x_layer.shape[1:]):
            raise ValueError(
                f"float references at the layer must be (B, {', '.join(map(str, x_layer.shape[1:]))}), got "
                f"{tuple(baselines.shape)}"
            )
        expanded = baselines.detach().to(x_layer)[:, None].expand(-1, *x_layer.shape)
        return expanded.contiguous()
    if isinstance(baselines, torch.Tensor):
        ids = batch.ids
        if ids is None or baselines.dim() != 2 or baselines.shape[1] != ids.shape[1]:
            raise ValueError(
                "integer references must be token ids (B, L) with the inputs' length L; got shape "
                f"{tuple(baselines.shape)}"
            )
        layers = []
        for reference in baselines.to(ids.device, ids.dtype):
            reference_batch = TokenBatch(batch.with_ids(reference.expand_as(ids).clone()))
            layers.append(_capture_chunks(run, reference_batch, rows)[0])
        return torch.stack(layers)
    ids = baseline_ids(baselines, batch, run.explainer.model, pad_token_id=pad_id, mask_token_id=mask_id)
    if ids is not None:
        return _capture_chunks(run, TokenBatch(batch.with_ids(ids)), rows)[0][None]
    return layer_baseline_value(baselines, x_layer)[None]
