"""Attribution maps overlaid on their images, stored for the report's "Saliency maps" section.

:func:`store_overlays` is what the image demo does for its CNN maps, for any maps: CNN saliency
``(N, 1, H, W)`` and vision-transformer maps alike, including patch grids ``(N, 1, h, w)`` as
:class:`~bbdecoder.AttentionRollout` / :class:`~bbdecoder.GradientRollout` ``attribute`` return
them (each map is resized to its image when drawn, bilinearly). The grid is one PNG blob; every
method's maps are also stored as arrays (kind ``"saliency"``), so they can be read back unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bbdecoder.report.blobs import figure_png, store_image
from bbdecoder.store.writer import RunWriter


def _as_array(maps: Any) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        return maps.detach().cpu().float().numpy()
    return np.asarray(maps, np.float32)


def store_overlays(
    writer: RunWriter,
    name: str,
    images: Any,
    maps: Mapping[str, Any],
    *,
    titles: Sequence[str] | None = None,
    signed: Sequence[str] = (),
    caption: str = "",
    section: str = "saliency",
    dpi: int = 100,
) -> int:
    """Store a grid (one row per image: the image, then one overlay per method) for the report.

    Args:
        images: ``(N, C, H, W)`` in [0, 1] (what the model saw, before normalisation).
        maps: method name -> ``(N, 1, h, w)`` maps; ``h, w`` may be smaller than the image (ViT patch
            grids, CAMs at a layer's resolution).
        titles: one row label per image.
        signed: methods drawn with a diverging colour map centred on zero (IG, gradients).
        caption: shown under the image in the report.
        section: the report section (default the "Saliency maps" section).

    Returns:
        The blob id of the PNG. Each method's maps are stored too, as arrays named
        ``"<name>: <method>"`` of kind ``"saliency"``.
    """
    from bbdecoder.viz import comparison_grid

    count = len(images)
    for method, batch in maps.items():
        array = _as_array(batch)
        if array.ndim != 4 or array.shape[0] != count or array.shape[1] != 1:
            raise ValueError(
                f"maps[{method!r}] must be (N, 1, h, w) with N = {count} images, got {array.shape}; "
                "use explainer.saliency(x) or attribute(x) of a rollout"
            )
    png = figure_png(comparison_grid(images, dict(maps), titles=titles, signed=signed), dpi=dpi)
    blob = store_image(writer, name, png, section=section, caption=caption)
    for method, batch in maps.items():
        writer.add_array("saliency", f"{name}: {method}", _as_array(batch), meta={"section": section})
    return blob


__all__ = ["store_overlays"]
