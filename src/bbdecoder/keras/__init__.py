"""BBDecoder for TensorFlow/Keras 3: the attribution methods for functional, Sequential and subclassed
Keras models, through ``tf.GradientTape``, with the PyTorch side's names and meanings.

Inputs are channels last (N, *spatial, C); maps come back as tf.Tensors (N, *spatial, 1). The
input-space methods are the PyTorch classes themselves on the Keras backend (written once; see
:mod:`bbdecoder.keras.front`), so they take the same arguments and give the same numbers. A final
softmax/sigmoid (``keras.applications``' default head) is looked through: the logits are explained.
Needs the optional extra ``pip install bbdecoder[tensorflow]``; importing :mod:`bbdecoder` alone never imports
TensorFlow. Keras is made to use the TensorFlow backend unless ``KERAS_BACKEND`` says otherwise.
"""

from bbdecoder.attribution.outputs import ProbabilityOutputError
from bbdecoder.keras._backend import keras, tf  # noqa: F401  (sets the environment first)
from bbdecoder.keras.base import KerasExplainer
from bbdecoder.keras.baselines import keras_baseline
from bbdecoder.keras.layer_methods import (
    AblationCAM,
    CompletenessError,
    EigenCAM,
    FullGrad,
    FullGradDecomposition,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    SimpleFullGrad,
    SmoothFullGrad,
    XGradCAM,
)
from bbdecoder.keras.methods import (
    RISE,
    FeatureAblation,
    Gradient,
    GradientSHAP,
    InputXGradient,
    IntegratedGradients,
    KernelSHAP,
    Occlusion,
    SmoothGrad,
)
from bbdecoder.keras.monitor import MonitorCallback
from bbdecoder.targets import TargetError

__all__ = [
    "RISE",
    "AblationCAM",
    "CompletenessError",
    "EigenCAM",
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
    "KerasExplainer",
    "KernelSHAP",
    "LayerCAM",
    "MonitorCallback",
    "Occlusion",
    "ProbabilityOutputError",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "TargetError",
    "XGradCAM",
    "keras_baseline",
]
