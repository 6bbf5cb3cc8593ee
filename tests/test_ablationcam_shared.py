"""AblationCAM runs the layers below the ablated one once per chunk; it falls back where that is inexact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bbdecoder import AblationCAM
from bbdecoder.hooks import count_hooks


def oracle(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """One sample and one channel at a time, the channel zeroed by a forward hook (the paper's loop)."""
    maps = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            seen: list[torch.Tensor] = []
            handle = layer.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.clone()))
            y = model(x[n : n + 1])[0, targets[n]]
            handle.remove()
            a = seen[-1]
            weights = []
            for c in range(a.shape[1]):

                def zero(_m: nn.Module, _i: object, out: torch.Tensor, c: int = c) -> torch.Tensor:
                    out = out.clone()
                    out[:, c] = 0
                    return out

                handle = layer.register_forward_hook(zero)
                weights.append((y - model(x[n : n + 1])[0, targets[n]]) / y)
                handle.remove()
            w = torch.stack(weights)
            maps.append(torch.relu((w[:, None, None] * a[0]).sum(0, keepdim=True)))
    return torch.stack(maps)


class Residual(nn.Module):
    """The ablated layer (``conv``) sits inside a block whose shortcut adds a tensor from the input."""

    def __init__(self, mode: str = "skip") -> None:
        super().__init__()
        self.mode = mode
        self.stem = nn.Conv2d(3, 5, 3, padding=1)
        self.conv = nn.Conv2d(5, 5, 3, padding=1)
        self.head = nn.Linear(5 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        h = torch.relu(self.conv(s) + s)  # a skip connection around the layer
        if self.mode == "input_batch":  # uses the input's batch size after the layer
            return self.head(h.reshape(x.shape[0], -1))
        out = self.head(h.flatten(1))
        if self.mode == "batch_sum":  # a reduction over the input batch (pathological, but possible)
            out = out + x.sum(dim=0).mean()
        return out


@pytest.mark.parametrize("mode", ["skip", "input_batch"])
@pytest.mark.parametrize("batch_size", [2, 3, 64])
def test_equals_the_one_by_one_loop(mode: str, batch_size: int) -> None:
    torch.manual_seed(0)
    model = Residual(mode).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    targets = [0, 3, 1]
    ours = AblationCAM(model, model.conv, batch_size=batch_size).layer_map(x, targets)
    expected = oracle(model, model.conv, x, targets)
    assert bool((expected > 0).any())
    torch.testing.assert_close(ours, expected)
    assert count_hooks(model) == 0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("skip", [1, 2, 1, 1]), ("input_batch", [1, 5, 5]), ("batch_sum", [1, 2, 5, 5])],
)
def test_the_layers_below_run_once_per_chunk_where_exact(mode: str, expected: list[int]) -> None:
    """rows[:2]: the recording pass and the clean scores. Then the probe on 2 channels, shared (1 row;
    ``input_batch`` fails there) and full (2 rows; ``batch_sum`` differs there), then one chunk of 5
    channels per sample: 1 row each where the shared trunk is exact, 5 otherwise."""
    torch.manual_seed(0)
    model = Residual(mode).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    rows: list[int] = []
    handle = model.stem.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        AblationCAM(model, model.conv, batch_size=5).layer_map(x, [0, 1])
    finally:
        handle.remove()
    assert rows == [2, 2, *expected]
