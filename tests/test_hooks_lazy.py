"""preserved_state and the explainers on a model with lazy modules (nn.LazyConv2d, nn.LazyLinear before
their first forward): the explainer's forward materialises them, the map equals the input gradient
computed by hand, the model's modes, flags and state_dict keys are as before, and an error before the
lazy layer is reached surfaces as itself (not as an "uninitialized parameter" error of the restore)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from bbdecoder import Gradient, IntegratedGradients
from bbdecoder.hooks import count_hooks, preserved_state


def lazy_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))


def test_an_explainer_on_a_fresh_lazy_model() -> None:
    model = lazy_net()
    keys = list(model.state_dict())
    assert all(is_lazy(p) for p in model.parameters())
    x = torch.randn(2, 1, 5, 5)
    maps = Gradient(model)(x, target=1)
    # materialised by the explainer's forward, and left consistent: regular modules, same keys, train
    # mode and requires_grad as before, no hook of ours (PyTorch removed its own init hooks)
    assert not any(is_lazy(p) for p in model.parameters())
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert model[3].weight.shape == (3, 4 * 5 * 5)
    assert list(model.state_dict()) == keys
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    assert count_hooks(model) == 0
    # the oracle: d output[:, 1] / d x by hand on the now-materialised model
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.eval()(xr)[:, 1].sum(), xr)
    model.train()
    torch.testing.assert_close(maps.reshape(grad.shape), grad)
    # and explaining again works on the materialised model
    ig = IntegratedGradients(model)(x, target=1, n_steps=32)
    assert ig.shape[0] == 2 and torch.isfinite(ig).all()


def test_an_error_before_the_lazy_layer_is_the_error_raised() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(RuntimeError, match="channels"):
        Gradient(model)(torch.randn(2, 1, 6, 6), target=0)  # 1 channel into a 3-channel conv
    assert is_lazy(model[3].weight)  # still lazy: it was never reached
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    model(torch.randn(2, 3, 6, 6))  # and its first real forward still materialises it
    assert model[3].weight.shape == (3, 4 * 6 * 6)


def test_flags_are_restored_on_lazy_parameters_materialised_or_not() -> None:
    model = lazy_net()
    model[3].bias.requires_grad = False  # a frozen lazy bias
    with pytest.raises(KeyError), preserved_state(model, eval_mode=True):
        for p in model.parameters():
            p.requires_grad = True
        raise KeyError("before any forward")
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert all(is_lazy(p) for p in model.parameters()) and model.training
    with preserved_state(model, eval_mode=True):
        for p in model.parameters():
            p.requires_grad = False
        model(torch.randn(1, 1, 5, 5))  # materialises inside the block
        assert not model.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert not any(is_lazy(p) for p in model.parameters()) and model.training


@pytest.mark.parametrize("method", ["gradient", "gradcam"])
def test_eval_mode_false_on_a_fresh_lazy_batchnorm(method: str) -> None:
    """With eval_mode=False a LazyBatchNorm2d is materialised by the explainer's train-mode forward;
    its statistics are then those of a fresh layer (zeros, ones, 0 batches), not the explained batch's."""
    from bbdecoder import GradCAM

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.LazyBatchNorm2d(),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    x = torch.randn(2, 1, 6, 6) * 3 + 1
    if method == "gradient":
        Gradient(model, eval_mode=False)(x, target=1)
    else:
        GradCAM(model, "0", eval_mode=False).saliency(x, 1)
    bn = model[1]
    assert not any(is_lazy(b) for b in bn.buffers())
    fresh = nn.BatchNorm2d(4)
    assert torch.equal(bn.running_mean, fresh.running_mean)
    assert torch.equal(bn.running_var, fresh.running_var)
    assert int(bn.num_batches_tracked) == 0
    assert model.training
