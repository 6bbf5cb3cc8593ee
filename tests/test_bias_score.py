"""Attention-IoU: exact oracles, batching, resolution, NaN handling, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from bbdecoder.bias import attention_iou, heatmap_score, mask_score, minmax_scale


def _reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The formula written out for one pair, in float64, from DESIGN.md."""
    p = a.double().flatten() / a.double().sum()
    q = b.double().flatten() / b.double().sum()
    return float((p * q).sum() / (((p + q) / 2) ** 2).sum())


def test_identical_maps_score_one() -> None:
    maps = torch.rand(5, 12, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(attention_iou(maps, maps), torch.ones(5))


def test_disjoint_supports_score_zero() -> None:
    a = torch.zeros(3, 8, 8)
    b = torch.zeros(3, 8, 8)
    a[:, :4] = torch.rand(3, 4, 8) + 0.1
    b[:, 4:] = torch.rand(3, 4, 8) + 0.1
    assert torch.equal(attention_iou(a, b), torch.zeros(3))


def test_invariant_to_positive_scaling() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(6, 10, 10, generator=g), torch.rand(6, 10, 10, generator=g)
    scale = torch.tensor([0.01, 1.0, 3.0, 7.5, 100.0, 1e4]).view(6, 1, 1)
    torch.testing.assert_close(attention_iou(a * scale, b / scale), attention_iou(a, b))


def test_binary_masks_give_4J_over_1_plus_3J() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.rand(200, 16, 16, generator=g) < torch.rand(200, 1, 1, generator=g)
    b = torch.rand(200, 16, 16, generator=g) < torch.rand(200, 1, 1, generator=g)
    keep = (a.flatten(1).sum(1) > 0) & (b.flatten(1).sum(1) > 0)
    a, b = a[keep], b[keep]
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    jaccard = inter / union
    expected = 4 * jaccard / (1 + 3 * jaccard)
    torch.testing.assert_close(attention_iou(a.float(), b.float()).double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 5, 64, 256])
def test_uniform_map_against_a_mask_of_k_pixels(k: int) -> None:
    n_pixels = 16 * 16
    mask = torch.zeros(1, 16, 16)
    mask.view(-1)[torch.randperm(n_pixels, generator=torch.Generator().manual_seed(k))[:k]] = 1
    score = attention_iou(torch.ones(1, 16, 16), mask)
    assert math.isclose(float(score), 4 / (3 + n_pixels / k), rel_tol=1e-6)


def test_batch_equals_per_image_loop_and_reference() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(17, 1, 7, 11, generator=g) ** 3, torch.rand(17, 7, 11, generator=g)
    batch = attention_iou(a, b)
    loop = torch.cat([attention_iou(a[i : i + 1], b[i : i + 1]) for i in range(17)])
    assert torch.equal(batch, loop)
    reference = torch.tensor([_reference(a[i], b[i]) for i in range(17)])
    torch.testing.assert_close(batch.double(), reference.double(), rtol=1e-6, atol=1e-7)
    assert batch.shape == (17,)


def test_empty_maps_give_nan_and_are_counted() -> None:
    a = torch.rand(4, 6, 6)
    b = torch.rand(4, 6, 6)
    a[1] = 0
    b[3] = 0
    score = attention_iou(a, b)
    assert torch.isnan(score).tolist() == [False, True, False, True]
    result = mask_score(a, b, resolution="mask")
    # a[0] etc. are min-max scaled: a constant (all-zero) map is empty too.
    assert result.n_nan == {"region": 2}
    assert result.table().loc[0, "n_nan"] == 2
    assert math.isfinite(result.table().loc[0, "mean"])


def test_constant_attention_map_is_empty_after_minmax() -> None:
    result = mask_score(torch.full((2, 4, 4), 3.0), torch.ones(2, 4, 4))
    assert result.n_nan["region"] == 2


def test_mask_score_minmax_scales_the_attention_only() -> None:
    g = torch.Generator().manual_seed(4)
    attention = torch.rand(5, 8, 8, generator=g) * 5 + 2  # offset: min-max changes the score
    masks = (torch.rand(5, 2, 8, 8, generator=g) > 0.6).float()
    result = mask_score(attention, masks, region_names=["left", "right"])
    for i, name in enumerate(["left", "right"]):
        expected = attention_iou(minmax_scale(attention), masks[:, i])
        torch.testing.assert_close(result[name], expected)
        assert not torch.allclose(result[name], attention_iou(attention, masks[:, i]))
    assert result.resolution == (8, 8)
    assert result.kind == "mask"


def test_resolution_is_selectable_and_reported() -> None:
    g = torch.Generator().manual_seed(5)
    attention = torch.rand(3, 4, 4, generator=g)
    masks = torch.zeros(3, 16, 16)
    masks[:, 2:9, 3:12] = 1
    at_masks = mask_score(attention, {"box": masks})
    at_attention = mask_score(attention, {"box": masks}, resolution="attention")
    explicit = mask_score(attention, {"box": masks}, resolution=(8, 8))
    assert (at_masks.resolution, at_attention.resolution, explicit.resolution) == ((16, 16), (4, 4), (8, 8))
    assert not torch.allclose(at_masks["box"], at_attention["box"])
    # At the attention grid, masks are area-averaged: the fraction of each cell inside the box.
    area = torch.nn.functional.avg_pool2d(masks[:, None], 4)[:, 0]
    torch.testing.assert_close(at_attention["box"], attention_iou(minmax_scale(attention), area))
    assert set(at_masks.table()["resolution"]) == {"16x16"}


def test_heatmap_score_compares_two_scaled_maps() -> None:
    g = torch.Generator().manual_seed(6)
    a, b = torch.rand(4, 1, 8, 8, generator=g) + 1, torch.rand(4, 1, 4, 4, generator=g)
    result = heatmap_score(a, b, resolution="first", name="target_vs_protected")
    up = torch.nn.functional.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False)
    expected = attention_iou(minmax_scale(a), minmax_scale(up))
    torch.testing.assert_close(result["target_vs_protected"], expected)
    assert result.resolution == (8, 8) and result.kind == "heatmap"
    torch.testing.assert_close(heatmap_score(a, a)["heatmap"], torch.ones(4))
    assert heatmap_score(a, b, resolution="second").resolution == (4, 4)


def test_bad_inputs_have_clear_errors() -> None:
    with pytest.raises(ValueError, match="negative"):
        attention_iou(-torch.rand(2, 4, 4), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        attention_iou(torch.rand(2, 4, 4), torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="unsqueeze"):
        attention_iou(torch.rand(4, 4), torch.rand(4, 4))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        attention_iou([[1.0]], torch.rand(1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution"):
        mask_score(torch.rand(2, 4, 4), torch.rand(2, 4, 4), resolution="native")
    with pytest.raises(ValueError, match="region names"):
        mask_score(torch.rand(2, 4, 4), torch.rand(2, 3, 4, 4), region_names=["a"])
    with pytest.raises(ValueError, match="images"):
        mask_score(torch.rand(2, 4, 4), {"a": torch.rand(3, 4, 4)})
    with pytest.raises(KeyError, match="regions are"):
        mask_score(torch.rand(2, 4, 4), {"a": torch.rand(2, 4, 4)})["b"]
