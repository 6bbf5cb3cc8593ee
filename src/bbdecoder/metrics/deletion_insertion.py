"""Deletion and insertion curves and their AUC (Petsiuk et al., RISE, BMVC 2018); MoRF/LeRF orders.

Pixels (spatial positions, all channels together) are ranked by the saliency map. *Deletion* starts
from the image and replaces the top-ranked pixels by a substrate, ``step`` pixels at a time; *insertion*
starts from the substrate and puts the image's pixels back in the same order. After every step the
model's probability of the target class (softmax) is recorded; the AUC is the trapezoid area under
that curve over the fraction of pixels changed, in [0, 1]. A faithful map gives a low deletion AUC and
a high insertion AUC. ``order="lerf"`` ranks least relevant first (a faithful map then keeps the score
high under deletion); ``"random"`` is the seeded random-map control.

All perturbed images of all samples are built on the device and evaluated in chunks of ``batch_size``
images per forward pass, under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.attribution.base import check_inputs
from bbdecoder.attribution.outputs import check_scores_from, model_output
from bbdecoder.hooks import preserved_state
from bbdecoder.metrics.substrates import SubstrateSpec, fixed_substrate, is_imputing, noisy_linear_impute
from bbdecoder.metrics.summary import summarise
from bbdecoder.targets import TargetLike, as_logits, fixed_target

MODES = ("deletion", "insertion")
ORDERS = ("morf", "lerf", "random")


@dataclass
class PerturbationResult:
    """Curves and AUCs of one perturbation protocol on one batch.

    Attributes:
        auc: (N,) area under each curve over the fraction of pixels changed.
        curves: (N, S + 1) target probability after 0..S steps (step 0: the untouched start).
        fractions: (S + 1,) fraction of pixels removed (deletion) or inserted (insertion) at each step.
        mode, order, substrate: the protocol.
        classes: (N,) the target classes (frozen on the clean inputs), ``None`` for callable targets.
    """

    auc: torch.Tensor
    curves: torch.Tensor
    fractions: torch.Tensor
    mode: str
    order: str
    substrate: str
    classes: torch.Tensor | None = None

    @property
    def per_sample(self) -> torch.Tensor:
        return self.auc

    def summary(self) -> dict[str, float]:
        """Statistics of the per-sample AUC (``n, n_nan, mean, std, median, min, max``)."""
        return summarise(self.auc)


def saliency_of(saliency: Any, inputs: torch.Tensor, target: TargetLike) -> torch.Tensor:
    """(N, H, W) maps from a tensor (N, H, W)/(N, 1, H, W) or from any explainer's ``saliency``."""
    if hasattr(saliency, "saliency") and not isinstance(saliency, torch.Tensor):
        saliency = saliency.saliency(inputs, target)
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(
            "saliency must be a tensor (N, 1, H, W) or an explainer with .saliency(), "
            f"got {type(saliency).__name__}"
        )
    maps = saliency.detach()
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"saliency must have one channel (N, 1, H, W), got {tuple(maps.shape)}")
        maps = maps[:, 0]
    if maps.dim() != 3 or maps.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"saliency must be (N, H, W) or (N, 1, H, W) with N = {inputs.shape[0]}, "
            f"got {tuple(saliency.shape)}"
        )
    size = tuple(inputs.shape[2:])
    if tuple(maps.shape[1:]) != size:
        maps = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return maps.to(inputs.device)


def pixel_ranks(maps: torch.Tensor, order: str, seed: int = 0) -> torch.Tensor:
    """(N, H*W) rank of every pixel in removal order (0 = first); ties keep raster order (stable sort)."""
    flat = maps.flatten(1)
    if order == "morf":
        perm = torch.argsort(flat, dim=1, descending=True, stable=True)
    elif order == "lerf":
        perm = torch.argsort(flat, dim=1, descending=False, stable=True)
    elif order == "random":
        generator = torch.Generator().manual_seed(seed)
        perm = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(flat.shape[0])])
        perm = perm.to(flat.device)
    else:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    ranks = torch.empty_like(perm)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(perm)
    ranks.scatter_(1, perm, positions)
    return ranks


def step_counts(num_pixels: int, step: int | None) -> torch.Tensor:
    """Pixels changed after 0..S steps: ``0, step, 2*step, ..., num_pixels`` (the last may be partial)."""
    if step is None:
        step = max(1, math.ceil(num_pixels / 100))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive number of pixels, got {step!r}")
    n_steps = math.ceil(num_pixels / step)
    return torch.clamp(torch.arange(n_steps + 1) * step, max=num_pixels)


def perturbation_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    saliency: Any,
    target: TargetLike = None,
    *,
    mode: str = "deletion",
    order: str = "morf",
    step: int | None = None,
    substrate: SubstrateSpec | None = None,
    blur_sigma: float | None = None,
    input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    score: str = "probability",
    batch_size: int = 256,
    road_noise: float = 0.01,
    seed: int = 0,
    scores_from: str = "logits",
) -> PerturbationResult:
    """Deletion or insertion curve and AUC for every sample.

    Args:
        model: a classifier returning logits (N, classes); evaluated in eval mode, modes restored.
        inputs: (N, C, H, W) images as the model (or ``input_transform``) takes them.
        saliency: (N, 1, H, W) / (N, H, W) maps, or any explainer (its ``saliency`` is called; its
            ``input_transform`` is used when none is given).
        target: ``None`` (arg-max of the clean inputs, then frozen), an int or one class per sample.
        mode: ``"deletion"`` or ``"insertion"``.
        order: ``"morf"`` (most relevant first), ``"lerf"`` (least relevant first) or ``"random"``.
        step: pixels changed per step (default ``ceil(H*W / 100)``).
        substrate: ``"zero"`` (deletion default), ``"blur"`` (insertion default), ``"mean"``, a number,
            a tensor, or ``"road"`` (noisy linear imputation of the removed pixels at every step).
        blur_sigma: for ``"blur"``; default one tenth of the smaller side.
        score: ``"probability"`` (softmax of the target) or ``"logit"``.
        batch_size: perturbed images per forward pass.
        road_noise: noise standard deviation of the ``"road"`` imputation.
        seed: seeds ``order="random"`` and the ROAD noise.
        scores_from: ``"logits"`` (default): a final softmax/sigmoid module is looked through and a
            probability output without one is refused (see :mod:`bbdecoder.attribution.outputs`);
            ``"output"``: the model's output as it is (for a model that returns probabilities, pair it
            with ``score="logit"`` to read them unchanged).

    Returns:
        :class:`PerturbationResult` with ``auc`` (N,), ``curves`` (N, S + 1) and ``fractions`` (S + 1,).
    """
    check_inputs(inputs, min_dim=4)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if input_transform is None:
        input_transform = getattr(saliency, "input_transform", None)
    substrate = ("zero" if mode == "deletion" else "blur") if substrate is None else substrate
    x = inputs.detach()
    n, _c, h, w = x.shape
    with preserved_state(model, eval_mode=True), torch.no_grad():

        def logits_of(batch: torch.Tensor) -> torch.Tensor:
            # The logits (also beneath a final softmax module, or a ModelOutput's ``logits``): the
            # probability score is their softmax, never a softmax of probabilities.
            model_input = input_transform(batch) if input_transform is not None else batch
            output = model_output(model, model_input, check_scores_from(scores_from))
            return as_logits(output, batch.shape[0])

        classes = fixed_target(logits_of(x), target, n)
        if not isinstance(classes, torch.Tensor):
            raise TypeError("deletion/insertion need class targets (None, an int or one class per sample)")
    maps = saliency_of(saliency, x, classes)
    ranks = pixel_ranks(maps, order, seed)
    counts = step_counts(h * w, step).to(x.device)
    n_points = counts.numel()
    imputing = is_imputing(substrate)
    background = None if imputing else fixed_substrate(substrate, x, blur_sigma=blur_sigma)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    values = torch.empty(n * n_points, device=x.device)
    with preserved_state(model, eval_mode=True), torch.no_grad():
        for start in range(0, n * n_points, batch_size):
            flat_index = torch.arange(start, min(start + batch_size, n * n_points), device=x.device)
            sample, point = flat_index // n_points, flat_index % n_points
            changed = (ranks[sample] < counts[point][:, None]).view(-1, 1, h, w)
            removed = changed if mode == "deletion" else ~changed
            if imputing:
                images = noisy_linear_impute(x[sample], removed, noise=road_noise, generator=generator)
            else:
                assert background is not None
                images = torch.where(removed, background[sample], x[sample])
            logits = logits_of(images)
            if score == "probability":
                logits = logits.softmax(dim=1)
            values[start : start + len(flat_index)] = logits.gather(1, classes[sample][:, None]).squeeze(1)
    curves = values.view(n, n_points).cpu()
    fractions = counts.cpu().double() / (h * w)
    auc = torch.trapezoid(curves.double(), fractions, dim=1).float()
    name = substrate if isinstance(substrate, str) else type(substrate).__name__
    return PerturbationResult(auc, curves, fractions.float(), mode, order, name, classes.cpu())


def deletion(
    model: nn.Module, inputs: torch.Tensor, saliency: Any, target: TargetLike = None, **kwargs: Any
) -> PerturbationResult:
    """Deletion curve and AUC (lower = more faithful); see :func:`perturbation_curve` for the options."""
    return perturbation_curve(model, inputs, saliency, target, mode="deletion", **kwargs)


def insertion(
    model: nn.Module, inputs: torch.Tensor, saliency: Any, target: TargetLike = None, **kwargs: Any
) -> PerturbationResult:
    """Insertion curve and AUC (higher = more faithful); see :func:`perturbation_curve` for the options."""
    return perturbation_curve(model, inputs, saliency, target, mode="insertion", **kwargs)


def morf_lerf(
    model: nn.Module, inputs: torch.Tensor, saliency: Any, target: TargetLike = None, **kwargs: Any
) -> dict[str, PerturbationResult]:
    """Deletion in most- and least-relevant-first order: ``{"morf": ..., "lerf": ...}``.

    The gap ``lerf.auc - morf.auc`` (per sample) is large for a faithful map and about 0 for a random
    one. The saliency is computed once when an explainer is given.
    """
    check_inputs(inputs, min_dim=4)
    if hasattr(saliency, "saliency") and not isinstance(saliency, torch.Tensor):
        kwargs.setdefault("input_transform", getattr(saliency, "input_transform", None))
        saliency = saliency.saliency(inputs, target)
    return {
        order: perturbation_curve(model, inputs, saliency, target, mode="deletion", order=order, **kwargs)
        for order in ("morf", "lerf")
    }
