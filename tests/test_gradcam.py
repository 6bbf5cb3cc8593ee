"""Grad-CAM against a hook-free computation and Captum's LayerGradCam."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.attribution import GradCAM
from bbdecoder.hooks import count_hooks

from .nets import ResNetStyle, randomize_batchnorm, vgg_style


def _vgg() -> nn.Sequential:
    torch.manual_seed(0)
    model = vgg_style()
    return randomize_batchnorm(model).double().eval()


def test_layer_map_equals_split_model_oracle() -> None:
    model = _vgg()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    targets = [0, 3, 4]
    # layer 9 is the last ReLU (inplace) after the third conv block
    features, head = model[:10], model[10:]
    with torch.no_grad():
        activation = features(x)
    activation.requires_grad_(True)
    head(activation)[torch.arange(3), torch.tensor(targets)].sum().backward()
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((weights * activation.detach()).sum(1, keepdim=True))
    cam = GradCAM(model, layer=model[9]).layer_map(x, targets)
    torch.testing.assert_close(cam, expected)
    # by qualified name and by ID give the same
    torch.testing.assert_close(GradCAM(model, layer="9").layer_map(x, targets), expected)


def test_matches_captum_layer_gradcam() -> None:
    captum = pytest.importorskip("captum.attr")
    model = _vgg()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ours = GradCAM(model, layer=model[8]).layer_map(x, [1, 2])  # BatchNorm output, before in-place ReLU
    theirs = captum.LayerGradCam(model, model[8]).attribute(x, target=[1, 2], relu_attributions=True)
    torch.testing.assert_close(ours, theirs)


def test_default_layer_is_last_spatial_output_and_maps_are_scaled_per_image() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetStyle()).eval()
    gradcam = GradCAM(model)
    saliency = gradcam.saliency(torch.randn(4, 3, 16, 16), [0, 1, 2, 3])
    assert gradcam.layer is model.layer2.relu  # not the 1x1 average pool
    assert saliency.shape == (4, 1, 16, 16)
    for image_map in saliency:
        assert image_map.min() == 0
        assert image_map.max() == pytest.approx(1.0) or image_map.max() == 0
    assert count_hooks(model) == 0


def test_all_zero_map_is_zero_not_nan() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)
    )
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # every activation is 0 after the ReLU
    saliency = GradCAM(model, layer=model[1]).saliency(torch.randn(2, 1, 8, 8))
    assert torch.equal(saliency, torch.zeros_like(saliency))


def test_errors_for_layers_that_do_not_fit() -> None:
    model = _vgg()
    with pytest.raises(KeyError, match="no module is named"):
        GradCAM(model, layer="nope")
    flat = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="no layer with a spatial output"):
        GradCAM(flat).saliency(torch.randn(2, 3, 2, 2))


def test_saliency_is_a_bilinear_resize_min_max_scaled_per_image() -> None:
    from .cam_nets import split_net

    model = split_net()
    x = torch.randn(3, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[1] *= 4.0  # a brighter image: a larger raw map
    targets = [0, 3, 1]
    with torch.no_grad():
        a = model[0](x)
    weights = model[1].fc.weight[torch.tensor(targets)] / (a.shape[2] * a.shape[3])
    raw = torch.relu((weights[:, :, None, None] * a).sum(1, keepdim=True))
    peaks = raw.flatten(1).amax(1)
    assert (peaks > 0).all() and peaks.max() > 2 * peaks.min()  # not zero, and scaled differently
    up = F.interpolate(raw, size=(12, 10), mode="bilinear", align_corners=False).flatten(1)
    low, high = up.amin(1, keepdim=True), up.amax(1, keepdim=True)
    expected = ((up - low) / (high - low)).view(3, 1, 12, 10)
    saliency = GradCAM(model, model[0]).saliency(x, targets)
    torch.testing.assert_close(saliency, expected)
    # the oracle is sensitive to what it pins: the resize mode, and min-max per image (not per batch)
    corners = F.interpolate(raw, size=(12, 10), mode="bilinear", align_corners=True)
    assert not torch.allclose(saliency, corners / corners.flatten(1).amax(1).view(3, 1, 1, 1), atol=1e-3)
    per_batch = (up - up.min()) / (up.max() - up.min())
    assert not torch.allclose(saliency.flatten(1), per_batch, atol=1e-3)
    for image_map in saliency:
        assert image_map.min() == 0 and image_map.max() == pytest.approx(1.0)
    # one image alone gives its map of the batch
    torch.testing.assert_close(GradCAM(model, model[0]).saliency(x[1:2], targets[1]), saliency[1:2])
