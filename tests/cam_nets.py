"""Small nets for the CAM tests: split into a trunk and a head so that oracles need no hooks."""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """Global average pool + Linear: dScore_k/dA_cij = W_kc / (H W), the closed forms' premise."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(a.mean(dim=(2, 3)))


def trunk(cin: int = 3, width: int = 6) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
    )


def split_net(
    seed: int = 0, classes: int = 4, width: int = 6, dtype: torch.dtype = torch.float64
) -> nn.Sequential:
    """``Sequential(trunk, LinearHead)``: layer = ``model[0]`` (a block, not a leaf)."""
    torch.manual_seed(seed)
    return nn.Sequential(trunk(width=width), LinearHead(width, classes)).to(dtype).eval()


class NonLinearHead(nn.Module):
    """A head whose gradient varies over positions (so Grad-CAM and HiResCAM differ)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(a)).amax(dim=(2, 3)))


def nonlinear_net(seed: int = 0, classes: int = 4, width: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(trunk(width=width), NonLinearHead(width, classes)).double().eval()
