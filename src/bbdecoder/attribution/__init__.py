"""Attribution methods: one module per method family, all sharing :class:`Explainer`."""

from bbdecoder.attribution.base import Explainer, Normalize
from bbdecoder.attribution.baselines import make_baseline
from bbdecoder.attribution.bias_layers import UnreachableBiasError
from bbdecoder.attribution.fullgrad import CompletenessError, FullGrad, FullGradDecomposition, SimpleFullGrad
from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient, InputXGradient
from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.attribution.outputs import ProbabilityOutputError
from bbdecoder.attribution.quadrature import quadrature
from bbdecoder.attribution.smooth_fullgrad import SmoothFullGrad
from bbdecoder.attribution.smoothgrad import SmoothGrad

__all__ = [
    "CompletenessError",
    "Explainer",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "Normalize",
    "ProbabilityOutputError",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "UnreachableBiasError",
    "make_baseline",
    "quadrature",
]
