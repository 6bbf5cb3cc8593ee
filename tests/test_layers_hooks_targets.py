"""LayerIndex selection, the hook manager and target resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bbdecoder.hooks import HookManager, count_hooks, preserved_state
from bbdecoder.layers import LayerIndex
from bbdecoder.targets import TargetError, resolve_classes, select_scores

from .nets import ResNetStyle


def test_ids_follow_named_modules_order_over_leaves() -> None:
    model = ResNetStyle()
    index = LayerIndex(model)
    leaves = [name for name, m in model.named_modules() if not list(m.children())]
    assert index.names == leaves
    assert [layer.id for layer in index] == list(range(len(leaves)))
    assert index[0].name == "stem" and index[0].type_name == "Conv2d"
    assert index[0].num_params == sum(p.numel() for p in model.stem.parameters())


def test_selection_by_id_name_glob_type_module_and_mixed() -> None:
    model = ResNetStyle()
    index = LayerIndex(model)
    assert [layer.name for layer in index.select("layer1.*")] == [
        n for n in index.names if n.startswith("layer1.")
    ]
    convs = index.select(nn.Conv2d)
    assert all(isinstance(layer.module, nn.Conv2d) for layer in convs) and len(convs) == 6
    mixed = index.select([3, "fc", model.stem, 3])
    assert [layer.name for layer in mixed] == ["stem", index[3].name, "fc"]  # ID order, no duplicates
    assert len(index.select(None)) == len(index)


def test_selection_errors_are_clear() -> None:
    index = LayerIndex(ResNetStyle())
    with pytest.raises(IndexError, match=r"IDs 0\.\.\d+"):
        index.select(999)
    with pytest.raises(KeyError, match="did you mean 'fc'"):
        index.select("fcc")
    with pytest.raises(KeyError, match="matches no layer"):
        index.select("head.*")
    with pytest.raises(KeyError, match="no leaf layer of type LSTM"):
        index.select(nn.LSTM)
    with pytest.raises(KeyError, match="not a leaf layer"):
        index.select(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot select"):
        index.select(1.5)  # type: ignore[arg-type]


def test_model_that_is_itself_a_leaf() -> None:
    index = LayerIndex(nn.Linear(2, 3))
    assert len(index) == 1 and index[0].display_name == "(root)"


def test_hook_manager_removes_hooks_even_on_error() -> None:
    model = ResNetStyle()
    with pytest.raises(RuntimeError), HookManager() as hooks:
        for module in model.modules():
            hooks.forward_hook(module, lambda *a: None)
        assert count_hooks(model) > 0
        raise RuntimeError("inside")
    assert count_hooks(model) == 0


def test_preserved_state_restores_modes_and_requires_grad() -> None:
    model = ResNetStyle().train()
    model.fc.eval()
    model.stem.weight.requires_grad_(False)
    with preserved_state(model, eval_mode=True):
        assert not any(m.training for m in model.modules())
        for p in model.parameters():
            p.requires_grad_(False)
    assert model.training and not model.fc.training
    assert not model.stem.weight.requires_grad and model.fc.weight.requires_grad


def test_target_kinds() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]], requires_grad=True)
    assert resolve_classes(logits, None, 2).tolist() == [1, 0]
    assert resolve_classes(logits, 2, 2).tolist() == [2, 2]
    assert resolve_classes(logits, [0, 2], 2).tolist() == [0, 2]
    assert resolve_classes(logits, torch.tensor([1, 1]), 2).tolist() == [1, 1]
    assert select_scores(logits, [0, 2], 2).tolist() == [0.0, 1.0]
    assert select_scores(logits, lambda out: out.sum(1), 2).tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("output", "target", "message"),
    [
        (torch.zeros(2, 3), [0, 1, 2], "3 targets"),
        (torch.zeros(2, 3), 3, r"out of range.*0\.\.2"),
        (torch.zeros(2, 3), -1, "out of range"),
        (torch.zeros(2, 3), [0.5, 1.0], "integers"),
        ((torch.zeros(2, 3), torch.zeros(2)), 0, "callable"),
        (torch.zeros(3), 0, "batch dimension"),
        (torch.zeros(2, 3, 4, 4), 1, "callable"),
        (torch.zeros(2, 3), lambda out: out, r"shape \(2,\)"),
    ],
)
def test_target_errors(output, target, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        select_scores(output, target, 2)
