"""The peers' conventions (Captum, pytorch-grad-cam) and no silently ignored keyword argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient as CaptumInputXGradient
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Saliency as CaptumSaliency
from torch import nn

import bbdecoder
from bbdecoder import (
    RISE,
    AblationCAM,
    AttentionRollout,
    EigenCAM,
    Explainer,
    FeatureAblation,
    FullGrad,
    GradCAM,
    GradCAMPlusPlus,
    Gradient,
    GradientRollout,
    GradientSHAP,
    HiResCAM,
    InputXGradient,
    IntegratedGradients,
    KernelSHAP,
    LayerCAM,
    Occlusion,
    PerSampleTargets,
    ScoreCAM,
    SimpleFullGrad,
    SmoothFullGrad,
    SmoothGrad,
    TargetError,
    XGradCAM,
)


# -- pytorch-grad-cam's target objects, written as that library writes them (it is not installable here)
class ClassifierOutputTarget:
    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if len(model_output.shape) == 1:
            return model_output[self.category]
        return model_output[:, self.category]


class ClassifierOutputSoftmaxTarget:
    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        if len(model_output.shape) == 1:
            return torch.softmax(model_output, dim=-1)[self.category]
        return torch.softmax(model_output, dim=-1)[:, self.category]


class SemanticSegmentationTarget:
    def __init__(self, category: int, mask: torch.Tensor) -> None:
        self.category = category
        self.mask = mask

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return (model_output[self.category, :, :] * self.mask).sum()


class Net(nn.Module):
    """A small CNN with BatchNorm whose forward counts its calls (to show errors come before any work)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.features(x))


class ScaledNet(nn.Module):
    """``forward(x, scale, shift=0.0)``: a per-sample tensor and a plain number after the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        hidden = torch.relu(self.conv(x * scale.view(-1, 1, 1, 1)))
        return torch.tanh(self.fc(hidden.flatten(1))) * 3 + shift


class Bound(nn.Module):
    """The oracle: ``model(x, *args)`` with the args fixed, for one sample at a time."""

    def __init__(self, model: nn.Module, *args: Any) -> None:
        super().__init__()
        self.model = model
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, *self.args)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


# -- every exported explainer refuses an unknown keyword --------------------------------------------
# (explainer factory, method, a misspelt keyword, the valid name it should suggest)
CASES: dict[str, tuple[Callable[[nn.Module], Any], str, str, str]] = {
    "Gradient": (Gradient, "attribute", "targt", "target"),
    "InputXGradient": (InputXGradient, "attribute", "targets_", "target"),
    "IntegratedGradients": (IntegratedGradients, "attribute", "n_step", "n_steps"),
    "SmoothGrad": (
        lambda m: SmoothGrad(IntegratedGradients(m), n_samples=2),
        "attribute",
        "n_step",
        "n_steps",
    ),
    "FullGrad": (FullGrad, "saliency", "target_clas", "target_class"),
    "SimpleFullGrad": (SimpleFullGrad, "saliency", "targt", "target"),
    "SmoothFullGrad": (lambda m: SmoothFullGrad(m, n_samples=2), "saliency", "target_clas", "target_class"),
    "GradCAM": (GradCAM, "saliency", "targt", "target"),
    "GradCAMPlusPlus": (GradCAMPlusPlus, "saliency", "targt", "target"),
    "HiResCAM": (HiResCAM, "saliency", "targt", "target"),
    "XGradCAM": (XGradCAM, "saliency", "targt", "target"),
    "LayerCAM": (LayerCAM, "saliency", "targt", "target"),
    "EigenCAM": (EigenCAM, "saliency", "targt", "target"),
    "ScoreCAM": (ScoreCAM, "__call__", "target", None),  # renamed to `targets`: accepted, see below
    "AblationCAM": (AblationCAM, "saliency", "targt", "target"),
    "Occlusion": (Occlusion, "attribute", "sliding_window_shape", "sliding_window_shapes"),
    "FeatureAblation": (FeatureAblation, "attribute", "feature_masks", "feature_mask"),
    "RISE": (lambda m: RISE(m, n_masks=4), "saliency", "baseline_s", "baselines"),
    "KernelSHAP": (KernelSHAP, "attribute", "n_sample", "n_samples"),
    "GradientSHAP": (GradientSHAP, "attribute", "stdev", "stdevs"),
    "AttentionRollout": (AttentionRollout, "saliency", "targt", "target"),
    "GradientRollout": (GradientRollout, "attribute", "targt", "target"),
}


def exported_explainers() -> list[str]:
    return sorted(
        name
        for name in bbdecoder.__all__
        if isinstance(getattr(bbdecoder, name), type)
        and issubclass(getattr(bbdecoder, name), Explainer)
        and name not in ("Explainer", "BaseCAM")
    )


def test_every_exported_explainer_is_covered() -> None:
    assert set(exported_explainers()) <= set(CASES), set(exported_explainers()) - set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_unknown_keyword_names_the_nearest_valid_one(name: str) -> None:
    factory, method, wrong, nearest = CASES[name]
    model = Net().eval()
    explainer = factory(model)
    x = images()
    calls = model.calls
    if nearest is None:  # ScoreCAM's __call__ is pytorch-grad-cam's: `target=` means its `targets=`
        wrong, nearest = "targetz", "targets"
    with pytest.raises(
        TypeError, match=rf"unexpected keyword argument '{wrong}'; did you mean '{nearest}'\?"
    ):
        getattr(explainer, method)(x, **{wrong: 1})
    assert model.calls == calls, "the keyword was refused only after running the model"
    other = "attribute" if method != "attribute" else "saliency"
    if method != "__call__":
        with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
            getattr(explainer, other)(x, no_such_option=1)


def test_abs_true_is_refused_with_captum_meaning() -> None:
    """Captum's Saliency(abs=True) used to be swallowed silently, giving the signed gradient."""
    model = Net().eval()
    with pytest.raises(TypeError, match=r"'abs'.*Saliency\(abs=True\) is Gradient\(model\)\.attribute"):
        Gradient(model).attribute(images(), target=1, abs=True)
    with pytest.raises(TypeError, match="'abs'"):
        Gradient(model).saliency(images(), abs=True)
    with pytest.raises(TypeError, match="'abs'"):
        SmoothGrad(Gradient(model), n_samples=2).attribute(images(), abs=True)


def test_peer_hints_for_arguments_that_live_elsewhere() -> None:
    model = Net().eval()
    with pytest.raises(TypeError, match=r"batch_size= .*constructor"):
        Occlusion(model).attribute(images(), sliding_window_shapes=3, perturbations_per_eval=4)
    with pytest.raises(TypeError, match="progress=True"):
        FeatureAblation(model).attribute(images(), show_progress=True)
    with pytest.raises(TypeError, match="NoiseTunnel is SmoothGrad"):
        IntegratedGradients(model).attribute(images(), nt_type="smoothgrad")


def test_alias_and_name_together_is_refused() -> None:
    with pytest.raises(TypeError, match="not both"):
        IntegratedGradients(Net().eval()).attribute(images(), baseline=0.0, baselines=0.0)


def test_cam_saliency_still_refuses_unknown_keywords_itself() -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        GradCAM(Net().eval()).saliency(images(), eigen_smooth=True)


# -- Captum's calls: same numbers as ours and as Captum's own ----------------------------------------
def test_captum_style_ig_matches_ours_and_captum() -> None:
    model = Net().double().eval()
    x = images(3).double()
    baseline = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ig = IntegratedGradients(model)
    ours = ig.attribute(x, target=[0, 3, 1], baseline=baseline, n_steps=16, method="gausslegendre")
    captum_style = ig.attribute(x, baselines=baseline, target=[0, 3, 1], n_steps=16, method="gausslegendre")
    torch.testing.assert_close(captum_style, ours, rtol=0, atol=0)
    theirs = CaptumIG(model).attribute(
        x, baselines=baseline, target=[0, 3, 1], n_steps=16, method="gausslegendre"
    )
    torch.testing.assert_close(captum_style, theirs, rtol=0, atol=1e-8)


@pytest.mark.parametrize("internal_batch_size", [None, 5])
def test_additional_forward_args_ig_matches_captum(internal_batch_size: int | None) -> None:
    """A per-sample tensor argument follows each path point's sample, also in chunks of 5 rows (not a
    multiple of the batch of 3), and a plain number is passed as it is."""
    model = ScaledNet().double().eval()
    x = images(3).double()
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    args = (scale, 0.25)
    ours = IntegratedGradients(model).attribute(
        x,
        target=[1, 0, 4],
        baselines=0.0,
        additional_forward_args=args,
        n_steps=12,
        method="gausslegendre",
        internal_batch_size=internal_batch_size,
    )
    theirs = CaptumIG(model).attribute(
        x,
        baselines=0.0,
        target=[1, 0, 4],
        additional_forward_args=args,
        n_steps=12,
        method="gausslegendre",
        internal_batch_size=internal_batch_size,
    )
    # Captum's Gauss-Legendre nodes differ from ours by ~1e-9 (ours are float64 to the last bit).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8)
    # The oracle without Captum: each sample alone through a model with its own scale bound.
    for i in range(3):
        alone = IntegratedGradients(Bound(model, scale[i : i + 1], 0.25)).attribute(
            x[i : i + 1], [1, 0, 4][i], n_steps=12, method="gausslegendre"
        )
        torch.testing.assert_close(ours[i : i + 1], alone, rtol=0, atol=1e-12)


def test_additional_forward_args_with_delta() -> None:
    """The clean scores of the convergence delta are taken with the arguments too."""
    model = ScaledNet().double().eval()
    x = images(2).double()
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    _, delta = IntegratedGradients(model).attribute(
        x,
        2,
        additional_forward_args=(scale,),
        n_steps=8,
        internal_batch_size=3,
        return_convergence_delta=True,
    )
    for i in range(2):
        _, alone = IntegratedGradients(Bound(model, scale[i : i + 1])).attribute(
            x[i : i + 1], 2, n_steps=8, return_convergence_delta=True
        )
        torch.testing.assert_close(delta[i : i + 1], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("ours_cls", "captum_cls"), [(Gradient, CaptumSaliency), (InputXGradient, CaptumInputXGradient)]
)
def test_additional_forward_args_gradient_methods_match_captum(ours_cls: type, captum_cls: type) -> None:
    model = ScaledNet().double().eval()
    x = images(3).double()
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ours = ours_cls(model).attribute(x, target=[4, 2, 0], additional_forward_args=(scale, 1.5))
    extra: dict[str, Any] = {"abs": False} if captum_cls is CaptumSaliency else {}
    theirs = captum_cls(model).attribute(x, target=[4, 2, 0], additional_forward_args=(scale, 1.5), **extra)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # A single non-tuple argument is one argument, as in Captum.
    single = ours_cls(model).attribute(x, target=[4, 2, 0], additional_forward_args=scale)
    torch.testing.assert_close(single, ours_cls(Bound(model, scale)).attribute(x, [4, 2, 0]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "call"),
    [
        (
            lambda m: Occlusion(m, batch_size=3),
            lambda e, x, t, **kw: e.attribute(x, t, sliding_window_shapes=2, **kw),
        ),
        (lambda m: FeatureAblation(m, batch_size=5), lambda e, x, t, **kw: e.attribute(x, t, **kw)),
        (
            lambda m: KernelSHAP(m, batch_size=7),
            lambda e, x, t, **kw: e.attribute(
                x, t, feature_mask=torch.arange(4).repeat_interleave(9).view(1, 1, 6, 6), **kw
            ),
        ),
        (lambda m: RISE(m, n_masks=6, batch_size=4), lambda e, x, t, **kw: e.saliency(x, t, **kw)),
        (lambda m: ScoreCAM(m, nn.Conv2d, batch_size=3), lambda e, x, t, **kw: e.saliency(x, t, **kw)),
        (lambda m: AblationCAM(m, nn.Conv2d, batch_size=3), lambda e, x, t, **kw: e.saliency(x, t, **kw)),
        (lambda m: GradCAM(m, nn.Conv2d), lambda e, x, t, **kw: e.saliency(x, t, **kw)),
        (lambda m: FullGrad(m, check=False), lambda e, x, t, **kw: e.saliency(x, t, **kw)),
    ],
    ids=[
        "Occlusion",
        "FeatureAblation",
        "KernelSHAP",
        "RISE",
        "ScoreCAM",
        "AblationCAM",
        "GradCAM",
        "FullGrad",
    ],
)
def test_additional_forward_args_follow_each_row_sample(make: Callable[[nn.Module], Any], call: Any) -> None:
    """Row batches that mix samples (perturbations, channel masks) give each row its sample's argument."""
    model = ScaledNet().double().eval()
    x = images(2).double()
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    targets = [3, 1]
    together = call(make(model), x, targets, additional_forward_args=(scale,))
    for i in range(2):
        alone = call(make(Bound(model, scale[i : i + 1])), x[i : i + 1], targets[i])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-10)


def test_additional_forward_args_gradient_shap_rows() -> None:
    """GradientSHAP's rows (sample x draw) each get their sample's argument: the draws replayed by hand."""
    model = ScaledNet().double().eval()
    x = images(2).double()
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    ours = GradientSHAP(model, seed=3).attribute(
        x, [3, 1], baselines=0.0, n_samples=2, internal_batch_size=3, additional_forward_args=(scale,)
    )
    generator = torch.Generator().manual_seed(3)
    torch.randint(1, (2,), generator=generator)  # the baseline choice per draw (one baseline)
    alphas = torch.rand(2, generator=generator, dtype=torch.float64)  # one per draw, shared by the samples
    expected = torch.zeros_like(x)
    for row in range(4):  # rows are draw-major: row % 2 = sample, row // 2 = draw
        i = row % 2
        point = alphas[row // 2] * x[i : i + 1]
        expected[i] += (x[i] * Gradient(Bound(model, scale[i : i + 1])).attribute(point, [3, 1][i])[0]) / 2
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_smoothgrad_passes_additional_forward_args_to_each_copy() -> None:
    model = ScaledNet().double().eval()
    x = images(1).double()
    scale = torch.tensor([1.5], dtype=torch.float64)
    for inner in (Gradient, IntegratedGradients):
        ours = SmoothGrad(inner(model), n_samples=3).attribute(x, 2, additional_forward_args=(scale,))
        bound = SmoothGrad(inner(Bound(model, scale)), n_samples=3).attribute(x, 2)
        torch.testing.assert_close(ours, bound, rtol=0, atol=0)
    x2 = images(2).double()
    scales = torch.tensor([1.5, 0.5], dtype=torch.float64)
    smooth = SmoothGrad(Gradient(model), n_samples=4, internal_batch_size=2)  # one copy per call
    ours = smooth.attribute(x2, [2, 0], additional_forward_args=(scales,))
    copies = smooth.noisy_copies(x2)
    expected = torch.stack(
        [
            torch.cat(
                [
                    Gradient(Bound(model, scales[i : i + 1])).attribute(c[i : i + 1], [2, 0][i])
                    for i in range(2)
                ]
            )
            for c in copies
        ]
    ).mean(dim=0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_no_additional_forward_args_leak_out_of_a_call() -> None:
    model = ScaledNet().double().eval()
    x = images(2).double()
    Gradient(model).attribute(x, 1, additional_forward_args=(torch.ones(2, dtype=torch.float64),))
    with pytest.raises(TypeError, match="scale"):
        Gradient(model).attribute(x, 1)  # the model's own error: its `scale` is missing again


# -- pytorch-grad-cam's calls: same numbers as ours --------------------------------------------------
def test_grad_cam_style_call_matches_ours() -> None:
    model = Net().eval()
    x = images(2)
    layer = model.features[3]
    cam = GradCAM(model, target_layers=[layer])
    grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(1)])
    assert (
        isinstance(grayscale, np.ndarray) and grayscale.dtype == np.float32 and grayscale.shape == (2, 6, 6)
    )
    ours = GradCAM(model, layer=layer).saliency(x, [3, 1])
    np.testing.assert_array_equal(grayscale, ours[:, 0].numpy())
    # keywords of either library, in any combination
    np.testing.assert_array_equal(cam(x, [3, 1]), grayscale)
    torch.testing.assert_close(
        cam.saliency(x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(1)]), ours
    )
    np.testing.assert_array_equal(cam(input_tensor=x, targets=None), cam.saliency(x)[:, 0].numpy())
    with pytest.raises(ValueError, match="eigen_smooth"):
        cam(x, eigen_smooth=True)


@pytest.mark.parametrize(
    "cam_cls", [GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM, ScoreCAM, AblationCAM]
)
def test_every_cam_takes_per_sample_target_objects(cam_cls: type) -> None:
    model = Net().double().eval()
    x = images(3).double()
    cam = cam_cls(model, target_layers=[model.features[3]])
    objects = cam(x, targets=[ClassifierOutputTarget(c) for c in (4, 0, 2)])
    np.testing.assert_allclose(objects, cam(x, [4, 0, 2]), rtol=0, atol=1e-6)


def test_per_sample_target_objects_in_the_input_space_methods() -> None:
    """Row batches (IG path points, SmoothGrad copies, perturbed rows) take the target of their sample."""
    model = Net().double().eval()
    x = images(3).double()
    objects = [ClassifierOutputTarget(c) for c in (4, 0, 2)]
    makers: list[tuple[Explainer, dict[str, Any]]] = [
        (Gradient(model), {}),
        (IntegratedGradients(model), {"n_steps": 7, "internal_batch_size": 4}),
        (SmoothGrad(IntegratedGradients(model), n_samples=3, internal_batch_size=6), {"n_steps": 3}),
        (Occlusion(model, batch_size=5), {"sliding_window_shapes": 3}),
        (GradientSHAP(model), {"n_samples": 3, "internal_batch_size": 2}),
        (FullGrad(model), {}),
        (SimpleFullGrad(model), {}),
    ]
    for explainer, options in makers:
        with_objects = explainer.attribute(x, objects, **options)
        with_classes = explainer.attribute(x, [4, 0, 2], **options)
        torch.testing.assert_close(
            with_objects, with_classes, rtol=0, atol=1e-12, msg=type(explainer).__name__
        )
    for explainer in (FullGrad(model), RISE(model, n_masks=5, batch_size=4, score="logit")):
        torch.testing.assert_close(explainer.saliency(x, targets=objects), explainer.saliency(x, [4, 0, 2]))


def test_one_target_object_is_a_callable_target() -> None:
    model = Net().double().eval()
    x = images(2).double()
    ig = IntegratedGradients(model)
    torch.testing.assert_close(
        ig.attribute(x, ClassifierOutputTarget(2), n_steps=5), ig.attribute(x, 2, n_steps=5)
    )


def test_softmax_and_segmentation_target_objects() -> None:
    model = Net().double().eval()
    x = images(2).double()
    grad = Gradient(model)
    softmax = grad.attribute(x, [ClassifierOutputSoftmaxTarget(1), ClassifierOutputSoftmaxTarget(3)])
    expected = grad.attribute(x, lambda out: torch.stack([out.softmax(1)[0, 1], out.softmax(1)[1, 3]]))
    torch.testing.assert_close(softmax, expected, rtol=0, atol=1e-12)

    torch.manual_seed(3)
    segmenter = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).double().eval()
    masks = [(torch.rand(6, 6, generator=torch.Generator().manual_seed(i)) > 0.5).double() for i in range(2)]
    seg = GradCAM(segmenter, target_layers=[segmenter[1]])
    by_object = seg(
        x, targets=[SemanticSegmentationTarget(2, masks[0]), SemanticSegmentationTarget(0, masks[1])]
    )

    def by_callable(out: torch.Tensor) -> torch.Tensor:
        return torch.stack([(out[0, 2] * masks[0]).sum(), (out[1, 0] * masks[1]).sum()])

    np.testing.assert_allclose(by_object, seg.saliency(x, by_callable)[:, 0].numpy(), rtol=0, atol=1e-6)


def test_per_sample_target_errors() -> None:
    model = Net().eval()
    x = images(2)
    with pytest.raises(TargetError, match="3 per-sample targets for a batch of 2"):
        Gradient(model).attribute(x, [ClassifierOutputTarget(1)] * 3)
    with pytest.raises(TargetError, match="one scalar tensor"):
        Gradient(model).attribute(x, [lambda row: row[:2], lambda row: row[:2]])
    with pytest.raises(TargetError, match="not a callable"):
        PerSampleTargets([ClassifierOutputTarget(1), 3])  # type: ignore[list-item]
    assert len(PerSampleTargets([ClassifierOutputTarget(1)]).repeat(3)) == 3


def test_target_layers_on_every_cam_and_a_two_layer_list_is_averaged() -> None:
    model = Net().eval()
    x = images(2)
    first, second = model.features[2], model.features[4]
    both = GradCAM(model, target_layers=[first, second])
    assert both.layers == [first, second]
    maps = [GradCAM(model, layer).saliency(x, 1) for layer in (first, second)]
    expected = torch.stack(maps).mean(0)
    low = expected.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = expected.flatten(1).max(1).values.view(-1, 1, 1, 1)
    torch.testing.assert_close(both.saliency(x, 1), (expected - low) / (high - low), rtol=0, atol=1e-6)


def test_a_subclass_names_the_keywords_it_reads_from_kwargs() -> None:
    class Scaled(Gradient):
        extra_keywords = ("factor",)

        def attribute(self, inputs: torch.Tensor, target: Any = None, **kwargs: Any) -> torch.Tensor:
            return super().attribute(inputs, target) * kwargs.get("factor", 1.0)

    model = Net().eval()
    x = images()
    torch.testing.assert_close(Scaled(model).attribute(x, 1, factor=2.0), Gradient(model).attribute(x, 1) * 2)
    with pytest.raises(TypeError, match="did you mean 'factor'"):
        Scaled(model).attribute(x, 1, facter=2.0)


def test_cam_layer_maps_take_the_same_keywords() -> None:
    model = ScaledNet().double().eval()
    x = images(2).double()
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    cam = GradCAM(model, nn.Conv2d)
    together = cam.layer_map(
        x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(1)], additional_forward_args=(scale,)
    )
    for i, c in enumerate((3, 1)):
        alone = GradCAM(Bound(model, scale[i : i + 1]), nn.Conv2d).layer_map(x[i : i + 1], c)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="did you mean 'target'"):
        cam.layer_maps(x, targett=1)


def test_token_options_only_where_a_layer_is_attributed() -> None:
    """``position=`` and the other token options are read at a layer; on images they are refused."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'position'"):
        Gradient(Net().eval()).attribute(images(), 1, position=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    scores = Gradient(model, layer=model[0]).attribute(ids, 1, position=-1)
    assert scores.shape == (2, 3, 4)
