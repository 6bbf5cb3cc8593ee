"""Attribution methods: one module per method family, all sharing :class:`Explainer`."""

from bbdecoder.attribution.base import Explainer, Normalize
from bbdecoder.attribution.baselines import make_baseline
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
from bbdecoder.attribution.fullgrad import CompletenessError, FullGrad, FullGradDecomposition, SimpleFullGrad
from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient, InputXGradient
from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.attribution.quadrature import quadrature
from bbdecoder.attribution.smooth_fullgrad import SmoothFullGrad
from bbdecoder.attribution.smoothgrad import SmoothGrad

__all__ = [
    "AblationCAM",
    "BaseCAM",
    "CompletenessError",
    "EigenCAM",
    "Explainer",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "GradCAMPlusPlus",
    "Gradient",
    "HiResCAM",
    "InputXGradient",
    "IntegratedGradients",
    "LayerCAM",
    "Normalize",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "XGradCAM",
    "channels_last",
    "make_baseline",
    "quadrature",
    "tokens",
]
