"""Per-layer cost against hand counts; captured features, grids and GIFs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bbdecoder.hooks import count_hooks
from bbdecoder.inspect import (
    capture_layer_output,
    cost_frame,
    feature_grid,
    layer_costs,
    plot_layer_costs,
    write_gif,
)

from .nets import ResNetStyle, randomize_batchnorm


def _conv_flops(n: int, conv: nn.Conv2d, out_hw: tuple[int, int]) -> int:
    kh, kw = conv.kernel_size
    return 2 * n * conv.out_channels * out_hw[0] * out_hw[1] * (conv.in_channels // conv.groups) * kh * kw


def test_flops_equal_hand_counts_for_conv_and_linear() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 10x12 -> 10x12
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=4),  # -> 4x5
        nn.Flatten(),
        nn.Linear(8 * 4 * 5, 7),
    )
    x = torch.randn(2, 3, 10, 12)
    costs = {cost.name: cost for cost in layer_costs(model, x, repeats=2)}
    assert costs["0"].flops == _conv_flops(2, model[0], (10, 12))
    assert costs["2"].flops == _conv_flops(2, model[2], (4, 5))
    assert costs["4"].flops == 2 * 2 * (8 * 4 * 5) * 7
    assert costs["1"].flops == 0 and costs["3"].flops == 0
    assert costs["0"].params == 3 * 8 * 9 + 8
    assert costs["0"].activation_bytes == 2 * 8 * 10 * 12 * 4
    assert all(cost.forward_ms >= 0 and cost.calls == 1 for cost in costs.values())
    frame = cost_frame(list(costs.values()))
    assert list(frame.columns) == [
        "id",
        "name",
        "type",
        "params",
        "flops",
        "activation_bytes",
        "forward_ms",
        "calls",
    ]


def test_shared_module_counts_every_call_and_model_is_untouched(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetStyle()).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    costs = {cost.name: cost for cost in layer_costs(model, torch.randn(2, 3, 16, 16), repeats=2)}
    assert costs["layer1.relu"].calls == 2  # the block's ReLU runs twice
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # BN stats not updated
    assert model.training and count_hooks(model) == 0
    path = plot_layer_costs(list(costs.values()), tmp_path / "cost.png")
    with Image.open(path) as picture:
        picture.verify()


def test_captured_features_equal_the_layer_output() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetStyle()).train()
    x = torch.randn(3, 3, 16, 16)
    features = capture_layer_output(model, x, model.layer1.bn2)
    model.eval()
    with torch.no_grad():
        stem = model.relu(model.bn(model.stem(x)))
        block = model.layer1
        expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
    model.train()
    torch.testing.assert_close(features, expected)
    assert model.training and count_hooks(model) == 0


def test_structured_outputs_are_kept() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return x * 2, {"neg": -x}

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            doubled, rest = self.pair(x)
            return doubled + rest["neg"]

    model = Wrapper()
    x = torch.randn(2, 3)
    doubled, rest = capture_layer_output(model, x, model.pair)
    torch.testing.assert_close(doubled, 2 * x)
    torch.testing.assert_close(rest["neg"], -x)
    with pytest.raises(RuntimeError, match="did not run"):
        capture_layer_output(model, x, nn.ReLU())


def test_feature_grid_non_square_and_fixed_scale() -> None:
    features = torch.arange(5 * 3 * 7, dtype=torch.float32).reshape(5, 3, 7)
    grid = feature_grid(features, gap=1)
    assert grid.shape == (2 * 3 + 1, 3 * 7 + 2, 3) and grid.dtype.name == "uint8"
    # a fixed scale makes a brighter map look brighter
    dim = feature_grid(torch.zeros(1, 2, 2), vmin=0, vmax=10)
    bright = feature_grid(torch.full((1, 2, 2), 10.0), vmin=0, vmax=10)
    assert not (dim == bright).all()
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        feature_grid(torch.zeros(2, 2, 2, 2))


def test_gif_has_one_frame_per_epoch(tmp_path) -> None:
    frames = [feature_grid(torch.full((4, 3, 5), float(epoch)), vmin=0, vmax=3) for epoch in range(4)]
    path = write_gif(frames, tmp_path / "evolution.gif", fps=5, scale=4)
    with Image.open(path) as gif:
        assert gif.n_frames == 4
        gif.seek(3)
        gif.convert("RGB")
    with pytest.raises(ValueError, match="no frames"):
        write_gif([], tmp_path / "empty.gif")


def _train_and_record(tmp_path, epochs: int = 3):
    import torch.nn.functional as F

    from bbdecoder.monitor import Analyzer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    probe = torch.randn(2, 1, 6, 10)  # non-square maps
    analyzer = Analyzer(model, tmp_path / "run", input_size=(1, 1, 6, 10))
    recorded = []
    for _ in range(epochs):
        for _ in range(2):
            x, y = torch.randn(8, 1, 6, 10), torch.randint(0, 3, (8,))
            loss = F.cross_entropy(analyzer.forward_propagation(x), y)
            optimizer.zero_grad()
            analyzer.backward_propagation(loss)
            optimizer.step()
        recorded.append(analyzer.get_inter_features(probe, 3))
        analyzer.end_epoch()
    return analyzer, model, probe, recorded


def test_get_inter_features_records_the_layer_output_per_epoch(tmp_path) -> None:
    from bbdecoder.store import open_run

    analyzer, model, probe, recorded = _train_and_record(tmp_path)
    model.train()
    features = analyzer.get_inter_features(probe, "3", dim=[0, 2], post_proc=torch.relu)
    assert model.training  # the mode is left as it was
    model.eval()
    with torch.no_grad():
        direct = model[:4](probe)
    model.train()
    torch.testing.assert_close(features, torch.relu(direct)[:, [0, 2]])
    torch.testing.assert_close(recorded[-1], direct)  # the weights did not change since
    reader = open_run(tmp_path / "run")
    rows = reader.blobs(kind="features", name="3")
    assert rows["epoch"].tolist() == [0, 1, 2, 3] and (rows["layer_id"] == 3).all()
    np.testing.assert_array_equal(reader.array(int(rows["blob_id"].iloc[0])), recorded[0].numpy())
    assert reader.array(int(rows["blob_id"].iloc[-1])).shape == (2, 2, 6, 10)
    with pytest.raises(IndexError, match="out of range"):
        analyzer.get_inter_features(probe, 3, dim=9)
    with pytest.raises(ValueError, match="exactly one"):
        analyzer.get_inter_features(probe, nn.ReLU)
    analyzer.close()
    assert count_hooks(model) == 0


def test_feature_evolution_gif_has_one_frame_per_recorded_epoch(tmp_path) -> None:
    from bbdecoder.store import open_run

    analyzer, _, _, _ = _train_and_record(tmp_path, epochs=3)
    with pytest.raises(ValueError, match="no features recorded"):
        analyzer.compile_feature_evolution(0)
    paths = analyzer.compile_feature_evolution(3, fps=4)
    with Image.open(paths["gif"]) as gif:
        assert gif.n_frames == 3
        assert gif.info["duration"] == 250
        gif.seek(2)
        assert gif.convert("RGB").size == (
            (3 * 10 + 2) * 4,
            (2 * 6 + 1) * 4,
        )  # 6 channels: 3 x 2 non-square cells
    with Image.open(paths["figure"]) as figure:
        figure.verify()
    stored = open_run(tmp_path / "run").blobs(kind="image")
    assert stored["name"].tolist() == ["feature_evolution/3"]
    assert stored["meta"].iloc[0]["section"] == "features"
    assert "epoch 0, epoch 1, epoch 2" in stored["meta"].iloc[0]["caption"]
    analyzer.close()


def test_layer_costs_summary_and_architecture_through_the_analyzer(tmp_path) -> None:
    from bbdecoder.inspect import architecture_dot
    from bbdecoder.monitor.graph import trace_graph
    from bbdecoder.report import build_report, read_table
    from bbdecoder.store import open_run

    analyzer, model, probe, _ = _train_and_record(tmp_path, epochs=1)
    table = analyzer.summary(print_table=False, cost=True)
    assert "MFLOPs" in table.splitlines()[0]
    conv_flops = 2 * 1 * 4 * 6 * 10 * 1 * 9
    assert f"{conv_flops / 1e6:.3f}" in table.splitlines()[1]
    picture = analyzer.architecture(engine="matplotlib")
    with Image.open(picture) as image:
        image.verify()
    dot = architecture_dot(trace_graph(model, probe), analyzer.index)
    assert "[0] 0 (Conv2d)" in dot and "[7] 7 (Linear)" in dot
    reader = open_run(tmp_path / "run")
    costs = read_table(reader, int(reader.blobs(kind="table", name="layer_costs")["blob_id"].iloc[-1]))
    assert costs["flops"].iloc[0] == conv_flops
    assert reader.blobs(kind="image", name="architecture")["meta"].iloc[0]["section"] == "architecture"
    report = build_report(tmp_path / "run")
    page = report.read_text()
    assert "Per-layer cost" in page and "Architecture" in page
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        analyzer.architecture(path=tmp_path / "arch.pdf")
    analyzer.close()


def test_architecture_with_graphviz_when_installed(tmp_path) -> None:
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed: the matplotlib fallback is tested above")
    from bbdecoder.inspect import draw_architecture
    from bbdecoder.layers import LayerIndex
    from bbdecoder.monitor.graph import trace_graph

    model = ResNetStyle()
    path = draw_architecture(
        trace_graph(model, torch.randn(1, 3, 16, 16)), LayerIndex(model), tmp_path / "a.svg"
    )
    assert "[17] fc (Linear)" in path.read_text()
