"""Coverage: every trainable parameter is tracked once, under its state_dict name, whoever owns it
(leaf, module with children, container, root; tied weights once), through torch.compile / DDP /
DataParallel; every stored L2 equals p.grad.norm() in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.hooks import count_hooks
from bbdecoder.layers import LayerIndex
from bbdecoder.monitor import Analyzer
from bbdecoder.store import open_run


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm that owns weight/bias and has children (drop, act)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ConvBNAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn1(self.conv(x)).mean((2, 3)))


class TinyViT(nn.Module):
    """Container-owned cls_token / pos_embed (ViT, DeiT), a layer-scale gamma on a block, a root scale."""

    def __init__(self, dim: int = 8, patches: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(6, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.logit_scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0])) * self.logit_scale + self.frozen


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))  # ConvNeXt / CaiT layer scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.act(self.fc(x))


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(ids))))


def _expected_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _one_step(analyzer: Analyzer, model: nn.Module, forward, inputs, target) -> dict[str, float]:
    out = forward(inputs)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    loss.backward()
    norms = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    analyzer.step(loss=loss)
    return norms


def _check_run(path, model: nn.Module, norms: dict[str, float]) -> None:
    run = open_run(path)
    l2 = run.scalars("l2").set_index("param")["value"]
    assert set(l2.index) == _expected_names(model)
    assert l2.index.is_unique  # tied weights: once
    for name, value in l2.items():
        assert abs(value - norms[name]) <= 1e-6 * norms[name], name


def test_fused_bn_act_with_children_is_tracked_under_its_own_id(tmp_path) -> None:
    torch.manual_seed(0)
    model = ConvBNAct()
    index = LayerIndex(model)
    with Analyzer(model, tmp_path) as an:
        norms = _one_step(an, model, model, torch.randn(2, 3, 5, 5), torch.tensor([0, 2]))
        table = an.summary(print_table=False)
    _check_run(tmp_path, model, norms)
    sc = open_run(tmp_path).scalars("l2").set_index("param")
    # the leaves keep their LayerIndex IDs; bn1 (which has children) gets the first ID after them
    assert sc.loc["conv.weight", "layer_id"] == index.select("conv")[0].id
    assert sc.loc["bn1.weight", "layer_id"] == len(index) and sc.loc["bn1.weight", "layer"] == "bn1"
    layers = open_run(tmp_path).layers().set_index("layer_id")
    assert layers.loc[len(index), "type"] == "BatchNormAct2d"
    assert "tracked 5 of 5 trainable parameter tensors" in table and "BatchNormAct2d" in table


def test_container_root_layer_scale_and_frozen_parameters(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyViT()
    with Analyzer(model, tmp_path) as an:
        norms = _one_step(an, model, model, torch.randn(3, 4, 6), torch.tensor([0, 1, 2]))
        assert an.coverage.tracked_tensors == an.coverage.trainable_tensors == len(_expected_names(model))
        assert an.coverage.total_tensors == an.coverage.trainable_tensors + 1  # the frozen one
    _check_run(tmp_path, model, norms)
    sc = open_run(tmp_path).scalars("l2").set_index("param")
    assert sc.loc["cls_token", "layer"] == "" and sc.loc["blocks.1.gamma", "layer"] == "blocks.1"
    assert "frozen" not in sc.index


def test_tied_weights_tracked_once(tmp_path) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    assert "out.weight" in model.state_dict()
    with Analyzer(model, tmp_path) as an:
        ids = torch.randint(0, 11, (2, 5))
        norms = _one_step(an, model, model, ids, torch.randint(0, 11, (2, 5)))
    _check_run(tmp_path, model, norms)
    assert "out.weight" not in set(open_run(tmp_path).scalars("l2").param)  # one tensor, its first name


def test_compiled_model_is_seen_through(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyViT()
    compiled = torch.compile(model, backend="eager")
    with Analyzer(compiled, tmp_path) as an:
        assert an.model is model
        norms = _one_step(an, model, an.forward_propagation, torch.randn(3, 4, 6), torch.tensor([0, 1, 2]))
    _check_run(tmp_path, model, norms)
    assert not any(n.startswith("_orig_mod") for n in open_run(tmp_path).scalars().param)


def test_data_parallel_and_ddp_wrappers_are_seen_through(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = ConvBNAct()
    with Analyzer(nn.DataParallel(model), tmp_path / "dp") as an:
        norms = _one_step(an, model, an.forward_propagation, torch.randn(2, 3, 5, 5), torch.tensor([0, 2]))
    _check_run(tmp_path / "dp", model, norms)
    model.zero_grad()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        with Analyzer(wrapped, tmp_path / "ddp") as an:
            norms = _one_step(
                an, model, an.forward_propagation, torch.randn(2, 3, 5, 5), torch.tensor([1, 2])
            )
        _check_run(tmp_path / "ddp", model, norms)
    finally:
        dist.destroy_process_group()
    assert count_hooks(model) == 0


def test_container_selection_by_name_and_id(tmp_path) -> None:
    model = TinyViT()
    index = LayerIndex(model)
    with Analyzer(model, tmp_path, layers=["", "blocks.0", "head"]) as an:
        names = {p.name for p in an._params}
        assert names == {
            "cls_token",
            "pos_embed",
            "logit_scale",
            "blocks.0.gamma",
            "head.weight",
            "head.bias",
        }
        root_id = next(o.id for o in an.owners if o.name == "")
        assert root_id >= len(index)
        assert {p.name for p in an._select_params(root_id)} == {"cls_token", "pos_embed", "logit_scale"}
