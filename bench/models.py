"""Benchmark networks built from scratch (no torchvision): a ResNet-18-shaped classifier.

``resnet18_shaped()`` has torchvision's ResNet-18 layout and parameter names (7x7/2 stem conv, BN,
in-place ReLU, 3x3/2 max-pool, BasicBlock x [2, 2, 2, 2] at widths 64/128/256/512, 1x1 projection
shortcuts named ``downsample``, adaptive average pool, ``fc`` to 1000 classes), so its ``state_dict``
keys are those of ``torchvision.models.resnet18``. Convolutions have no bias, as in torchvision; the
bias layers FullGrad sees are the 20 BatchNorms and the final Linear.

Untrained weights with default BatchNorm statistics make every BN's effective bias
``beta - mean * gamma / sqrt(var + eps)`` zero, which would make FullGrad's bias part vanish. So
``calibrated_resnet18`` draws seeded BN affine parameters and then sets the running statistics from a
train-mode pass over seeded smooth images: activations then have trained-like scale and the effective
biases are non-zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN stages with a residual add; a 1x1 conv-BN projection when the shape changes.

    The projection runs after ``bn2`` as in torchvision. ``downsample_first=True`` runs it first: the
    same function, but execution order no longer follows registration order (used to show that
    matching gradients to layers by order, as pytorch-grad-cam does, silently pairs the wrong ones).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, downsample_first: bool = False
    ) -> None:
        super().__init__()
        self.downsample_first = downsample_first
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.downsample is not None and self.downsample_first:
            identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None and not self.downsample_first:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet18Shaped(nn.Module):
    """ResNet-18 layout; ``forward`` maps (N, 3, H, W) images to (N, num_classes) logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        downsample_first: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            first = BasicBlock(in_channels, width, stride, downsample_first=downsample_first)
            stages.append(nn.Sequential(first, BasicBlock(width, width)))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: 1x1 reduce, 3x3 (stride here), 1x1 expand x4, residual add."""

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Shaped(nn.Module):
    """ResNet-50 layout (Bottleneck x [3, 4, 6, 3], widths 64-512, 2048 features, 25.6 M parameters)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        stages = []
        for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            layers = []
            for block in range(blocks):
                stride = 2 if block == 0 and index > 0 else 1
                layers.append(Bottleneck(in_channels, width, stride))
                in_channels = 4 * width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_shaped(seed: int = 0) -> ResNet50Shaped:
    """A seeded ResNet-50-layout net in eval mode (default BN statistics: speed studies only)."""
    torch.manual_seed(seed)
    return ResNet50Shaped().eval()


def smooth_images(n: int, size: int = 224, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 3, size, size) seeded images with image-like spatial structure (smooth blobs plus fine noise),
    roughly zero mean and unit variance like normalised photographs."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, max(2, size // 16), max(2, size // 16), generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    images = images + 0.3 * torch.randn(n, 3, size, size, generator=generator)
    return ((images - images.mean()) / images.std()).to(dtype)


def calibrated_resnet18(
    seed: int = 0,
    num_classes: int = 1000,
    calibration_size: int = 224,
    calibration_batch: int = 4,
    downsample_first: bool = False,
) -> ResNet18Shaped:
    """A seeded ResNet-18-shaped net in eval mode whose BatchNorms have non-zero effective biases."""
    torch.manual_seed(seed)
    model = ResNet18Shaped(num_classes=num_classes, downsample_first=downsample_first)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
                module.momentum = None  # cumulative average: one pass sets the statistics exactly
                module.reset_running_stats()
        model.train()
        model(smooth_images(calibration_batch, calibration_size, seed=seed + 2))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet18Shaped",
    "ResNet50Shaped",
    "calibrated_resnet18",
    "resnet50_shaped",
    "smooth_images",
]
