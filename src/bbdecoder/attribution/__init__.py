"""Attribution methods: one module per method family, all sharing :class:`Explainer`."""

from bbdecoder.attribution.base import Explainer, Normalize
from bbdecoder.attribution.baselines import make_baseline
from bbdecoder.attribution.bias_layers import UnreachableBiasError
from bbdecoder.attribution.cam import (
    AblationCAM,
    BaseCAM,
    EigenCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
    channels_last,
    tokens,
)
from bbdecoder.attribution.feature_ablation import FeatureAblation
from bbdecoder.attribution.fullgrad import CompletenessError, FullGrad, FullGradDecomposition, SimpleFullGrad
from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient, InputXGradient
from bbdecoder.attribution.gradient_shap import GradientSHAP
from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.attribution.kernel_shap import KernelSHAP
from bbdecoder.attribution.layer_attribution import LayerCallError
from bbdecoder.attribution.occlusion import Occlusion
from bbdecoder.attribution.outputs import ProbabilityOutputError
from bbdecoder.attribution.perturbation import PerturbationExplainer
from bbdecoder.attribution.quadrature import quadrature
from bbdecoder.attribution.rise import RISE
from bbdecoder.attribution.smooth_fullgrad import SmoothFullGrad
from bbdecoder.attribution.smoothgrad import SmoothGrad

__all__ = [
    "RISE",
    "AblationCAM",
    "BaseCAM",
    "CompletenessError",
    "EigenCAM",
    "Explainer",
    "FeatureAblation",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "GradCAMPlusPlus",
    "Gradient",
    "GradientSHAP",
    "HiResCAM",
    "InputXGradient",
    "IntegratedGradients",
    "KernelSHAP",
    "LayerCAM",
    "LayerCallError",
    "Normalize",
    "Occlusion",
    "PerturbationExplainer",
    "ProbabilityOutputError",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "UnreachableBiasError",
    "XGradCAM",
    "channels_last",
    "make_baseline",
    "quadrature",
    "tokens",
]
