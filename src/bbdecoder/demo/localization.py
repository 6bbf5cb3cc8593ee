"""Scoring saliency maps against ground-truth object masks, and the baselines a map must beat.

Three scores per image, for a non-negative map ``a`` (H, W) and a binary mask ``m`` (H, W):

* **pointing game** (Zhang et al., 2016): 1 if the map's maximum lies inside the mask (grown by
  ``tolerance`` pixels), else 0. Ties are broken by the first maximum in row-major order, so a
  constant map points at the top-left pixel.
* **energy in mask** (the energy-based pointing game of Score-CAM, Wang et al., 2020):
  ``sum(a * m) / sum(a)``, the fraction of the map's mass inside the object.
* **Attention-IoU** with the mask (:func:`bbdecoder.bias.mask_score`: the map min-max scaled first).

A map that does not look at the object scores about the mask's area fraction on the first two: a
**random map** does exactly that in expectation, and an **edge detector** (the Sobel gradient
magnitude of the image) is the "explanation" that needs no model at all.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from bbdecoder.bias.score import as_map_batch


def _pair(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    maps = as_map_batch(maps, "maps").double()
    masks = as_map_batch(masks, "masks")
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ; give one mask per map at the "
            "map's resolution (resize the maps to the input size first)"
        )
    finite = maps[torch.isfinite(maps)]
    if finite.numel() and bool((finite < 0).any()):
        raise ValueError("maps must be non-negative; take .abs() of a signed map (e.g. IG) before scoring")
    return maps, masks > 0


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 0) -> torch.Tensor:
    """1.0 where the map's arg-max pixel is inside the mask (dilated by ``tolerance`` pixels), else 0.0.

    Args:
        maps: (N, H, W) or (N, 1, H, W), non-negative.
        masks: same shape, binary (non-zero = object).
        tolerance: grow the mask by this many pixels (a square neighbourhood) before the test.

    Returns:
        (N,) float64 tensor of 0.0 and 1.0.
    """
    maps, masks = _pair(maps, masks)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance:
        grown = F.max_pool2d(masks[:, None].double(), 2 * tolerance + 1, stride=1, padding=tolerance)
        masks = grown[:, 0] > 0
    peak = torch.nan_to_num(maps, nan=-1.0).flatten(1).argmax(dim=1)
    return masks.flatten(1).gather(1, peak[:, None])[:, 0].double()


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The fraction of each map's mass inside its mask, ``sum(a * m) / sum(a)``.

    Args:
        maps: (N, H, W) or (N, 1, H, W), non-negative.
        masks: same shape, binary.

    Returns:
        (N,) float64 in [0, 1]; NaN for a map that sums to zero.
    """
    maps, masks = _pair(maps, masks)
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float64).tiny), float("nan"))


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """The edge-detector baseline: Sobel gradient magnitude of each image, (N, 1, H, W), non-negative.

    Colour images: the magnitude of each channel, summed over channels (edges of any colour count).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    n, c, h, w = images.shape
    flat = F.pad(images.double().reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    gradient = F.conv2d(flat, kernels)  # (N*C, 2, H, W)
    magnitude = gradient.pow(2).sum(dim=1).sqrt().reshape(n, c, h, w)
    return magnitude.sum(dim=1, keepdim=True).to(images.dtype)


def random_maps(like: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """The random baseline: i.i.d. uniform maps shaped like ``like`` (N, 1, H, W), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(like.shape, generator=generator, dtype=torch.float64).to(like.dtype)


def localization_scores(
    maps: torch.Tensor, masks: torch.Tensor, *, tolerance: int = 0
) -> dict[str, torch.Tensor]:
    """All three scores of one method: ``{"pointing", "energy", "attention_iou"}``, each (N,) float64.

    Energy and Attention-IoU are taken of the map min-max scaled per image (as in Score-CAM's energy
    game and :func:`~bbdecoder.bias.mask_score`), so a constant offset (FullGrad's per-layer sums have
    one) does not count as mass everywhere; a constant map scores NaN on both.
    """
    from bbdecoder.bias import mask_score, minmax_scale

    maps_, masks_ = _pair(maps, masks)
    scaled = minmax_scale(maps_)
    iou = mask_score(maps_.float(), {"object": masks_.float()})["object"].double()
    return {
        "pointing": pointing_game(maps_, masks_, tolerance=tolerance),
        "energy": energy_in_mask(scaled, masks_),
        "attention_iou": iou,
    }


__all__ = ["energy_in_mask", "localization_scores", "pointing_game", "random_maps", "sobel_edges"]
