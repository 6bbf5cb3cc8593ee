"""A synthetic planted-bias data set with known feature locations, and a tiny CNN for it.

Each 3 x 16 x 16 image holds

* the **true feature**: a grey 5 x 5 shape, a "+" (label 0) or an "x" (label 1), at a random place;
* the **spurious feature**: a 3 x 3 solid patch, green (attribute 0) or red (attribute 1), at another
  random place that never overlaps the shape.

The spurious attribute equals the label with probability ``bias_rate`` (e.g. 0.95 for a biased
training set, 0.5 for an unbiased one). The masks of both regions are returned with every image,
so an attention map can be scored against exactly the pixels that carry each feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

IMAGE_SIZE = 16
SHAPE_SIZE = 5
PATCH_SIZE = 3


@dataclass
class PlantedBiasData:
    """Images (N, 3, 16, 16) in [0, 1]; labels and spurious attributes (N,); region masks (N, 16, 16)."""

    images: torch.Tensor
    labels: torch.Tensor
    spurious: torch.Tensor
    true_masks: torch.Tensor
    spurious_masks: torch.Tensor

    @property
    def aligned(self) -> torch.Tensor:
        """(N,) bool: the spurious attribute agrees with the label."""
        return self.spurious == self.labels

    def __len__(self) -> int:
        return int(self.labels.numel())


def _shapes() -> torch.Tensor:
    plus = torch.zeros(SHAPE_SIZE, SHAPE_SIZE)
    plus[SHAPE_SIZE // 2, :] = 1
    plus[:, SHAPE_SIZE // 2] = 1
    cross = torch.eye(SHAPE_SIZE) + torch.eye(SHAPE_SIZE).flip(1)
    return torch.stack([plus, cross.clamp(max=1)])


def _box_masks(rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    grid = torch.arange(IMAGE_SIZE)
    in_rows = (grid[None, :] >= rows[:, None]) & (grid[None, :] < rows[:, None] + size)
    in_cols = (grid[None, :] >= cols[:, None]) & (grid[None, :] < cols[:, None] + size)
    return (in_rows[:, :, None] & in_cols[:, None, :]).float()


def make_planted_bias_data(
    n: int, bias_rate: float, *, seed: int = 0, shape_intensity: float = 0.5, noise: float = 0.3
) -> PlantedBiasData:
    """``n`` images whose spurious patch colour equals the label with probability ``bias_rate``.

    Args:
        n: number of images (labels balanced in expectation).
        bias_rate: P(spurious attribute == label), in [0, 1]; 0.5 = no correlation.
        seed: fixes everything (labels, positions, noise).
        shape_intensity: grey level of the true shape; noise: amplitude of the uniform background.
    """
    if not 0 <= bias_rate <= 1:
        raise ValueError(f"bias_rate must be a probability in [0, 1], got {bias_rate}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    agree = torch.rand(n, generator=g) < bias_rate
    spurious = torch.where(agree, labels, 1 - labels)
    span = IMAGE_SIZE - SHAPE_SIZE + 1
    shape_r = torch.randint(0, span, (n,), generator=g)
    shape_c = torch.randint(0, span, (n,), generator=g)
    patch_r = torch.empty(n, dtype=torch.long)
    patch_c = torch.empty(n, dtype=torch.long)
    todo = torch.ones(n, dtype=torch.bool)
    while bool(todo.any()):  # rejection sampling: the patch keeps a 1-pixel gap from the shape's box
        k = int(todo.sum())
        r = torch.randint(0, IMAGE_SIZE - PATCH_SIZE + 1, (k,), generator=g)
        c = torch.randint(0, IMAGE_SIZE - PATCH_SIZE + 1, (k,), generator=g)
        sr, sc = shape_r[todo], shape_c[todo]
        apart = (r + PATCH_SIZE < sr) | (r > sr + SHAPE_SIZE) | (c + PATCH_SIZE < sc) | (c > sc + SHAPE_SIZE)
        idx = todo.nonzero().squeeze(1)
        patch_r[idx[apart]], patch_c[idx[apart]] = r[apart], c[apart]
        todo[idx[apart]] = False
    images = noise * torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    true_masks = _box_masks(shape_r, shape_c, SHAPE_SIZE)
    spurious_masks = _box_masks(patch_r, patch_c, PATCH_SIZE)
    shapes = _shapes()[labels]
    for i in range(n):  # small per-image pastes; n is a few thousand at most
        top, left = int(shape_r[i]), int(shape_c[i])
        window = images[i, :, top : top + SHAPE_SIZE, left : left + SHAPE_SIZE]
        images[i, :, top : top + SHAPE_SIZE, left : left + SHAPE_SIZE] = torch.maximum(
            window, shape_intensity * shapes[i]
        )
    channel = torch.where(spurious == 1, 0, 1)  # red (channel 0) for attribute 1, green (channel 1) for 0
    patch = spurious_masks.bool()
    images[torch.arange(n), channel] = torch.where(patch, 1.0, images[torch.arange(n), channel])
    return PlantedBiasData(images, labels, spurious, true_masks, spurious_masks)


class PlantedBiasCNN(nn.Module):
    """Conv-ReLU, max-pool, Conv-ReLU (8 x 8 maps: Grad-CAM's default layer), global average pool, Linear."""

    def __init__(self, width: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(self.gap(x)))


def train_planted_bias_cnn(
    data: PlantedBiasData, *, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> nn.Module:
    """Train :class:`PlantedBiasCNN` on ``data`` with Adam and fixed seeds; returned in eval mode."""
    torch.manual_seed(seed)
    model = PlantedBiasCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def group_accuracy(model: nn.Module, data: PlantedBiasData) -> dict[str, float]:
    """Accuracy on all images, on the bias-aligned ones and on the bias-conflicting ones."""
    correct = (model(data.images).argmax(dim=1) == data.labels).float()
    return {
        "all": float(correct.mean()),
        "aligned": float(correct[data.aligned].mean()),
        "conflict": float(correct[~data.aligned].mean()),
    }


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded permutation of 0..n-1 with no fixed point (for shuffling masks across images), n >= 2."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


@dataclass
class PlantedBiasStudy:
    """Everything one run of the study produced (see :func:`run_planted_bias_study`).

    Attributes:
        test: the unbiased test set; models: ``{"biased": ..., "control": ...}``.
        accuracy: model -> ``{"all", "aligned", "conflict"}`` test accuracies.
        maps: model -> Grad-CAM maps of the true labels (N, 1, 16, 16).
        scores: model -> :class:`~bbdecoder.bias.BiasScores` (regions ``true``, ``spurious``).
        shuffled: model -> spurious-region scores with the masks shuffled across images (N,).
        uniform_baseline: ``4 / (3 + N / k)`` for the spurious patch.
    """

    test: PlantedBiasData
    models: dict[str, nn.Module]
    accuracy: dict[str, dict[str, float]]
    maps: dict[str, torch.Tensor]
    scores: dict[str, Any]
    shuffled: dict[str, torch.Tensor]
    uniform_baseline: float


def run_planted_bias_study(
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 600,
    train_bias_rate: float = 0.95,
    epochs: int = 10,
) -> PlantedBiasStudy:
    """Train a model on a biased set and a control on an unbiased one; score Grad-CAM against the masks.

    The test set is unbiased (rate 0.5) and fixed (seed 1) so seeds only change training.
    """
    from bbdecoder.attribution.gradcam import GradCAM
    from bbdecoder.bias import attention_maps, mask_score

    test = make_planted_bias_data(n_test, 0.5, seed=1)
    sets = {
        "biased": make_planted_bias_data(n_train, train_bias_rate, seed=seed),
        "control": make_planted_bias_data(n_train, 0.5, seed=seed),
    }
    shuffle = derangement(n_test, seed=seed)
    models, accuracy, maps, scores, shuffled = {}, {}, {}, {}, {}
    for name, train in sets.items():
        model = train_planted_bias_cnn(train, epochs=epochs, seed=seed)
        models[name] = model
        accuracy[name] = group_accuracy(model, test)
        maps[name] = attention_maps(model, test.images, test.labels, explainer=GradCAM(model))
        scores[name] = mask_score(maps[name], {"true": test.true_masks, "spurious": test.spurious_masks})
        shuffled[name] = mask_score(maps[name], {"spurious": test.spurious_masks[shuffle]})["spurious"]
    baseline = 4 / (3 + IMAGE_SIZE * IMAGE_SIZE / PATCH_SIZE**2)
    return PlantedBiasStudy(test, models, accuracy, maps, scores, shuffled, baseline)
