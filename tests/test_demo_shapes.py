"""The generated shapes set, the localization scores against hand-computed oracles, and the demo's
own check: FullGrad, IG and Grad-CAM beat a random map and an edge detector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.path import Path as PolygonPath

from bbdecoder.demo.localization import (
    energy_in_mask,
    localization_scores,
    pointing_game,
    random_maps,
    sobel_edges,
)
from bbdecoder.demo.shapes import CLASSES, make_shapes_data, shapes_accuracy, train_shapes_cnn
from bbdecoder.demo.shapes_run import beats_baselines, explain_and_score

TRIANGLE = [(-0.55 / math.tan(math.pi / 6), -0.55), (0.55 / math.tan(math.pi / 6), -0.55), (0.0, 1.1)]
ARM = 0.32
POLYGONS = {
    "square": [(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)],
    "triangle": TRIANGLE,
    "cross": [
        (ARM, 1), (ARM, ARM), (1, ARM), (1, -ARM), (ARM, -ARM), (ARM, -1),
        (-ARM, -1), (-ARM, -ARM), (-1, -ARM), (-1, ARM), (-ARM, ARM), (-ARM, 1),
    ],
}  # fmt: skip


def oracle_mask(label: int, cy: float, cx: float, radius: float, angle: float, size: int) -> np.ndarray:
    """The object's pixels by an independent route: a disc by distance, polygons by matplotlib's
    point-in-polygon test, the object frame rotated into the image."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    name = CLASSES[label]
    if name == "disc":
        return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
    c, s = math.cos(angle), math.sin(angle)
    vertices = [(cx + radius * (c * u - s * v), cy + radius * (s * u + c * v)) for u, v in POLYGONS[name]]
    inside = PolygonPath(vertices).contains_points(np.stack([xs.ravel(), ys.ravel()], axis=1))
    return inside.reshape(size, size)


def test_generator_is_seeded_and_fast_enough_to_be_vectorised() -> None:
    a, b = make_shapes_data(64, seed=3), make_shapes_data(64, seed=3)
    assert (
        torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    )
    c = make_shapes_data(64, seed=4)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 3, 64, 64) and a.images.dtype == torch.float32
    assert a.masks.shape == (64, 64, 64) and a.masks.dtype == torch.bool
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    assert set(a.labels.tolist()) == set(range(len(CLASSES)))
    # a prefix of a bigger set is not the smaller set (the stream depends on n), but each image has an object
    assert bool((a.masks.flatten(1).sum(1) > 100).all())


@pytest.mark.parametrize("size", [64, 96])
def test_masks_match_an_independent_rasterisation_of_each_object(size: int) -> None:
    data = make_shapes_data(40, seed=1, size=size)
    for i in range(len(data)):
        (cy, cx), radius, angle = data.centres[i].tolist(), float(data.radii[i]), float(data.angles[i])
        expected = oracle_mask(int(data.labels[i]), cy, cx, radius, angle, size)
        mismatch = int((expected != data.masks[i].numpy()).sum())
        assert mismatch <= 2, (CLASSES[int(data.labels[i])], mismatch)  # float ties on the boundary only


def test_the_mask_is_where_the_object_was_painted() -> None:
    # No strokes, no noise: off the object the image is the bilinear background field, whose discrete
    # Laplacian is zero except on the knot lines; inside the mask it is the object's texture and edges.
    with_object = make_shapes_data(8, seed=5, n_strokes=0, noise=0.0)
    images, masks = with_object.images.double(), with_object.masks
    lap = (images[..., 1:-1, 2:] + images[..., 1:-1, :-2] + images[..., 2:, 1:-1] + images[..., :-2, 1:-1]
           - 4 * images[..., 1:-1, 1:-1]).abs().sum(1)  # fmt: skip
    inner = masks[:, 1:-1, 1:-1]
    grown = torch.nn.functional.max_pool2d(masks[:, None].float(), 3, 1, 1)[:, 0, 1:-1, 1:-1] > 0
    assert float(lap[~grown].median()) < 1e-3  # background: piecewise bilinear off the object
    assert float(lap[inner].mean()) > 10 * float(lap[~grown].mean())  # the textured object is not


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="n must be"):
        make_shapes_data(0)
    with pytest.raises(ValueError, match="size"):
        make_shapes_data(4, size=16)


# -- scores against hand-computed values ---------------------------------------------------------
def test_a_map_concentrated_in_the_mask_points_and_has_all_its_energy_inside() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 5:7, 1:3] = True
    inside = masks.double() * torch.tensor([1.0, 3.0])[:, None, None]
    assert pointing_game(inside, masks).tolist() == [1.0, 1.0]
    assert energy_in_mask(inside, masks).tolist() == [1.0, 1.0]
    scores = localization_scores(inside, masks)
    assert torch.allclose(scores["attention_iou"], torch.ones(2, dtype=torch.float64))


def test_scores_of_maps_outside_and_half_inside() -> None:
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2] = True  # 2 of 16 pixels
    outside = torch.zeros(1, 4, 4)
    outside[0, 3, 3] = 5.0
    assert pointing_game(outside, mask).item() == 0.0 and energy_in_mask(outside, mask).item() == 0.0
    half = torch.zeros(1, 4, 4)
    half[0, 0, 0], half[0, 2, 2] = 1.0, 3.0  # mass 1 inside, 3 outside; peak outside
    assert energy_in_mask(half, mask).item() == pytest.approx(0.25)
    assert pointing_game(half, mask).item() == 0.0
    assert pointing_game(half, mask, tolerance=2).item() == 1.0  # (2, 2) is 2 pixels from (0, 1)
    assert pointing_game(half, mask, tolerance=1).item() == 0.0
    uniform = torch.ones(1, 4, 4)
    assert energy_in_mask(uniform, mask).item() == pytest.approx(2 / 16)
    assert math.isnan(energy_in_mask(torch.zeros(1, 4, 4), mask).item())
    # Attention-IoU of a uniform map (no min-max possible: constant -> empty -> NaN is the documented rule)
    assert math.isnan(localization_scores(uniform, mask)["attention_iou"].item())


def test_scores_refuse_signed_and_mismatched_maps() -> None:
    masks = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="non-negative"):
        energy_in_mask(-torch.ones(1, 4, 4), masks)
    with pytest.raises(ValueError, match="differ"):
        pointing_game(torch.ones(1, 5, 5), masks)


def test_sobel_baseline_against_a_hand_computed_step_edge() -> None:
    image = torch.zeros(1, 1, 5, 5)
    image[..., 3:] = 1.0  # a vertical step between columns 2 and 3
    edges = sobel_edges(image)[0, 0]
    # Sobel x at column 2 and 3: (1 + 2 + 1) * 1 = 4 in the interior rows; 0 where the image is flat
    assert edges[2, 2].item() == pytest.approx(4.0) and edges[2, 3].item() == pytest.approx(4.0)
    assert edges[2, 0].item() == 0.0 and edges[2, 4].item() == 0.0
    colour = image.repeat(1, 3, 1, 1)
    assert torch.allclose(sobel_edges(colour), 3 * sobel_edges(image))


def test_random_baseline_scores_about_the_mask_area() -> None:
    data = make_shapes_data(200, seed=2)
    maps = random_maps(torch.zeros(200, 1, 64, 64), seed=0)
    area = float(data.masks.double().mean())
    assert float(energy_in_mask(maps, data.masks).mean()) == pytest.approx(area, abs=0.01)
    assert float(pointing_game(maps, data.masks).mean()) == pytest.approx(area, abs=0.07)


# -- the trained CNN and its explanations -----------------------------------------------------------
@pytest.fixture(scope="module")
def small_model() -> tuple[torch.nn.Module, float]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = train_shapes_cnn(make_shapes_data(SMALL_TRAIN, seed=0), epochs=SMALL_EPOCHS, seed=0)
    return model, shapes_accuracy(model, make_shapes_data(200, seed=10_000))


SMALL_TRAIN, SMALL_EPOCHS, SMALL_ACCURACY = 800, 3, 0.6


def test_small_cnn_learns_the_shapes_deterministically(small_model: tuple[torch.nn.Module, float]) -> None:
    _, accuracy = small_model
    assert accuracy > SMALL_ACCURACY  # chance is 0.25
    again = train_shapes_cnn(make_shapes_data(128, seed=0), epochs=1, seed=0)
    twice = train_shapes_cnn(make_shapes_data(128, seed=0), epochs=1, seed=0)
    for a, b in zip(again.state_dict().values(), twice.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_explanations_of_the_small_cnn_beat_the_baselines(small_model: tuple[torch.nn.Module, float]) -> None:
    model, _ = small_model
    test = make_shapes_data(24, seed=10_000)
    maps, table = explain_and_score(model, test, ig_steps=8)
    assert set(table["method"]) == {
        "FullGrad", "SimpleFullGrad", "Integrated Gradients", "Grad-CAM", "random map", "Sobel edges"
    }  # fmt: skip
    assert all(m.shape == (24, 1, 64, 64) and bool((m >= 0).all()) for m in maps.values())
    check = beats_baselines(table)
    assert check["passed"].all(), table.to_string()


@pytest.mark.slow
def test_demo_sized_cnn_reaches_its_stated_accuracy_and_its_maps_beat_the_baselines() -> None:
    from bbdecoder.demo.shapes_run import ShapesSettings

    s = ShapesSettings()
    model = train_shapes_cnn(make_shapes_data(s.n_train, seed=s.seed), epochs=s.epochs, seed=s.seed)
    test = make_shapes_data(s.n_test, seed=s.seed + 10_000)
    assert shapes_accuracy(model, test) > 0.9
    _, table = explain_and_score(model, test[: s.n_eval], ig_steps=s.ig_steps)
    check = beats_baselines(table)
    assert check["passed"].all(), table.to_string()
    assert bool((check[["pointing_margin", "energy_margin"]] > 0.1).all().all()), check.to_string()
