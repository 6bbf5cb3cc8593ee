"""Mask score and heatmap score: Attention-IoU of min-max scaled attention maps, at a stated resolution."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from bbdecoder.bias.resolution import Resolution, resize_maps, resize_masks, resolve_resolution
from bbdecoder.bias.score import as_map_batch, attention_iou, minmax_scale


@dataclass
class BiasScores:
    """Per-image Attention-IoU scores for one or more named regions (or map pairs).

    Attributes:
        scores: region name -> Tensor (N,), NaN where a map or mask was empty.
        resolution: the (H, W) grid both maps were compared on; the score depends on it.
        kind: ``"mask"`` (attention vs region masks) or ``"heatmap"`` (attention vs attention).
    """

    scores: dict[str, torch.Tensor]
    resolution: tuple[int, int]
    kind: str
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def regions(self) -> list[str]:
        return list(self.scores)

    @property
    def n_nan(self) -> dict[str, int]:
        """How many images gave NaN (empty map or mask), per region."""
        return {name: int(torch.isnan(s).sum()) for name, s in self.scores.items()}

    def __getitem__(self, region: str) -> torch.Tensor:
        if region not in self.scores:
            raise KeyError(f"no region {region!r}; the regions are {self.regions}")
        return self.scores[region]

    def table(self) -> pd.DataFrame:
        """One row per region: ``region, n, n_nan, mean, std, resolution`` (NaNs excluded, counted)."""
        rows = []
        for name, s in self.scores.items():
            valid = s[~torch.isnan(s)].double()
            rows.append(
                {
                    "region": name,
                    "n": int(s.numel()),
                    "n_nan": int(s.numel() - valid.numel()),
                    "mean": float(valid.mean()) if valid.numel() else float("nan"),
                    "std": float(valid.std(unbiased=False)) if valid.numel() else float("nan"),
                    "resolution": f"{self.resolution[0]}x{self.resolution[1]}",
                }
            )
        return pd.DataFrame(rows)

    def groups(
        self,
        target_labels: Any,
        protected_labels: Any,
        predictions: Any = None,
        **kwargs: Any,
    ) -> pd.DataFrame:
        """:func:`bbdecoder.bias.group_scores` over every region (kwargs: ``n_boot``, ``ci``, ``seed``)."""
        from bbdecoder.bias.groups import group_scores

        table = group_scores(self.scores, target_labels, protected_labels, predictions, **kwargs)
        table["resolution"] = f"{self.resolution[0]}x{self.resolution[1]}"
        return table


def _named_masks(
    masks: torch.Tensor | Mapping[str, torch.Tensor], region_names: list[str] | None
) -> dict[str, torch.Tensor]:
    if isinstance(masks, Mapping):
        if region_names is not None:
            raise ValueError("give region names either as the dict's keys or as region_names, not both")
        if not masks:
            raise ValueError("masks is an empty dict; give at least one region")
        return {str(name): as_map_batch(m, f"masks[{name!r}]") for name, m in masks.items()}
    if not isinstance(masks, torch.Tensor):
        raise TypeError(
            f"masks must be a Tensor (N, R, H, W) / (N, H, W) or a dict, got {type(masks).__name__}"
        )
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.dim() != 4:
        raise ValueError(
            f"masks must be (N, H, W) for one region or (N, R, H, W) for R regions, got {tuple(masks.shape)}"
        )
    names = region_names or (
        ["region"] if masks.shape[1] == 1 else [f"region{i}" for i in range(masks.shape[1])]
    )
    if len(names) != masks.shape[1]:
        raise ValueError(f"got {len(names)} region names for {masks.shape[1]} mask channels")
    return {name: as_map_batch(masks[:, i], f"masks[:, {i}]") for i, name in enumerate(names)}


def mask_score(
    attention: torch.Tensor,
    masks: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    region_names: list[str] | None = None,
    resolution: Resolution = "mask",
) -> BiasScores:
    """Attention-IoU between each image's attention map and each of its region masks.

    The attention maps are resized to the comparison resolution (bilinear), then min-max scaled per
    image; masks (binary or soft, non-negative) are resized by area (shrinking) or nearest neighbour.

    Args:
        attention: (N, H, W) or (N, 1, H, W) attention maps, e.g. from :func:`attention_maps`.
        masks: (N, R, H, W) with ``region_names``, (N, H, W) for one region, or a dict
            ``name -> (N, H, W)``.
        resolution: ``"mask"`` (default: the masks' grid), ``"attention"``, an int or ``(H, W)``.

    Returns:
        :class:`BiasScores` with one (N,) tensor per region and the ``resolution`` used.
    """
    att = as_map_batch(attention, "attention")
    named = _named_masks(masks, region_names)
    mask_size = tuple(next(iter(named.values())).shape[-2:])
    for name, m in named.items():
        if m.shape[0] != att.shape[0]:
            raise ValueError(f"mask {name!r} has {m.shape[0]} images but attention has {att.shape[0]}")
        if tuple(m.shape[-2:]) != mask_size:
            raise ValueError(
                f"all masks must share one size; {name!r} is {tuple(m.shape[-2:])}, not {mask_size}"
            )
    size = resolve_resolution(resolution, tuple(att.shape[-2:]), mask_size, ("attention", "mask"))  # type: ignore[arg-type]
    scaled = minmax_scale(resize_maps(att, size))
    scores = {name: attention_iou(scaled, resize_masks(m.to(att.device), size)) for name, m in named.items()}
    return BiasScores(scores, size, "mask")


def heatmap_score(
    attention_a: torch.Tensor,
    attention_b: torch.Tensor,
    *,
    resolution: Resolution = "first",
    name: str = "heatmap",
) -> BiasScores:
    """Attention-IoU between two attention maps of the same images, e.g. target vs protected attribute.

    Both maps are resized (bilinear) to the comparison resolution and min-max scaled per image.

    Args:
        attention_a: (N, H, W) or (N, 1, H, W), e.g. Grad-CAM of one output unit.
        attention_b: the same for the other unit.
        resolution: ``"first"`` (default: ``attention_a``'s grid), ``"second"``, an int or ``(H, W)``.
        name: the key of the scores in the result.

    Returns:
        :class:`BiasScores` with ``scores[name]`` of shape (N,) and the ``resolution`` used.
    """
    a = as_map_batch(attention_a, "attention_a")
    b = as_map_batch(attention_b, "attention_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"attention_a has {a.shape[0]} maps but attention_b has {b.shape[0]}")
    size = resolve_resolution(resolution, tuple(a.shape[-2:]), tuple(b.shape[-2:]), ("first", "second"))  # type: ignore[arg-type]
    score = attention_iou(minmax_scale(resize_maps(a, size)), minmax_scale(resize_maps(b.to(a.device), size)))
    return BiasScores({name: score}, size, "heatmap")
