"""Model-parameter randomisation sanity check (Adebayo et al., NeurIPS 2018), cascading top-down.

A copy of the explainer (and with it the model) is made; its parametrised layers are re-initialised
one after another from the output towards the input, cumulatively, and after each stage the maps of
the same inputs are compared with the original maps by Spearman rank correlation. A map that explains
the *model* must change (correlation falling towards 0) as its weights are destroyed; a map that stays
the same is explaining the input (e.g. an edge detector), not the network. The user's model is never
touched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bbdecoder.layers import LayerIndex, LayerSelection
from bbdecoder.metrics.ranks import spearman
from bbdecoder.metrics.summary import summarise
from bbdecoder.targets import TargetLike


@dataclass
class RandomisationResult:
    """Spearman correlation between original and randomised maps, per stage and sample.

    Attributes:
        stages: names of the layers randomised at each stage (cumulative: stage k has layers 0..k).
        spearman: (S, N) rank correlation of the maps after stage k with the original maps (NaN where
            a map is constant, counted in ``summary``).
        original: (N, H, W) the original maps.
        randomised: list of (N, H, W) maps, one per stage.
    """

    stages: list[str]
    spearman: torch.Tensor
    original: torch.Tensor
    randomised: list[torch.Tensor] = field(repr=False)

    @property
    def per_sample(self) -> torch.Tensor:
        """(N,) correlation after the last stage (everything randomised)."""
        return self.spearman[-1]

    def summary(self) -> dict[str, float]:
        """Statistics of the fully-randomised correlation (``n, n_nan, mean, ...``)."""
        return summarise(self.per_sample)

    def stage_means(self) -> list[float]:
        """Mean correlation (NaNs left out) after each stage."""
        return [
            float(s[~torch.isnan(s)].mean()) if bool((~torch.isnan(s)).any()) else float("nan")
            for s in self.spearman
        ]


def parametrised_layers(model: nn.Module) -> list[str]:
    """Qualified names of the leaf modules with parameters, in ``named_modules`` order."""
    return [
        info.name for info in LayerIndex(model) if any(True for _ in info.module.parameters(recurse=False))
    ]


def randomise_module(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise ``module``'s own parameters in place (on a copy!), reproducibly.

    Modules with ``reset_parameters`` use their own initialiser under a forked, seeded RNG; other
    parameters are redrawn from a normal with the parameter's own standard deviation.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                # BN's reset gives weight=1, bias=0: an identity, not a random layer.
                nn.init.normal_(module.weight, 1.0, 0.5)
                nn.init.normal_(module.bias, 0.0, 0.5)
        else:
            for param in module.parameters(recurse=False):
                std = float(param.std()) if param.numel() > 1 else 1.0
                param.normal_(0.0, std if std > 0 else 1.0)


def randomisation_check(
    explainer: Any,
    inputs: torch.Tensor,
    target: TargetLike = None,
    *,
    layers: LayerSelection = None,
    seed: int = 0,
) -> RandomisationResult:
    """Cascading top-down randomisation check of any explainer.

    Args:
        explainer: any explainer with ``.model`` and ``.saliency(inputs, target)``; it is deep-copied
            with its model, so the original explainer and model stay exactly as they were.
        inputs: (N, C, H, W).
        target: as everywhere; ``None`` is frozen to the original model's arg-max classes, so all stages
            explain the same classes.
        layers: which layers to randomise (IDs, names, globs, types; see ``LayerIndex.select``);
            default every leaf module with parameters. They are randomised from the last to the first.
        seed: seeds the re-initialisation.

    Returns:
        :class:`RandomisationResult` with ``spearman`` (S, N).
    """
    if not hasattr(explainer, "model") or not hasattr(explainer, "saliency"):
        raise TypeError(
            f"{type(explainer).__name__} needs a .model and a .saliency(inputs, target) method for the check"
        )
    if hasattr(explainer, "freeze_target"):
        target = explainer.freeze_target(inputs, target)
    original = explainer.saliency(inputs, target).detach()
    working = copy.deepcopy(explainer)
    model: nn.Module = working.model
    if layers is None:
        names = parametrised_layers(model)
    else:
        names = [info.name for info in LayerIndex(explainer.model).select(layers)]
    if not names:
        raise ValueError("no layer with parameters to randomise; check `layers=`")
    modules = dict(model.named_modules())
    order: Sequence[str] = list(reversed(names))
    generator = torch.Generator().manual_seed(seed)
    randomised, correlations = [], []
    for name in order:
        randomise_module(modules[name], generator)
        maps = working.saliency(inputs, target).detach()
        randomised.append(maps[:, 0] if maps.dim() == 4 else maps)
        correlations.append(spearman(original.flatten(1), maps.flatten(1)))
    flat_original = original[:, 0] if original.dim() == 4 else original
    return RandomisationResult(list(order), torch.stack(correlations).float(), flat_original, randomised)
