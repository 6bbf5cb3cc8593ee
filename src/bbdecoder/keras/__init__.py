"""BBDecoder for TensorFlow/Keras 3: the attribution methods for functional, Sequential and subclassed
Keras models, through ``tf.GradientTape``, with the PyTorch side's names and meanings.

Inputs are channels last (N, *spatial, C); maps come back as tf.Tensors (N, *spatial, 1). Needs the
optional extra ``pip install bbdecoder[tensorflow]``; importing :mod:`bbdecoder` alone never imports
TensorFlow. Keras is made to use the TensorFlow backend unless ``KERAS_BACKEND`` says otherwise.
"""

from bbdecoder.keras._backend import keras, tf  # noqa: F401  (sets the environment first)
from bbdecoder.keras.base import KerasExplainer
from bbdecoder.keras.gradient import Gradient, InputXGradient
from bbdecoder.keras.integrated_gradients import IntegratedGradients, keras_baseline
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
from bbdecoder.keras.monitor import MonitorCallback
from bbdecoder.keras.smoothgrad import SmoothGrad
from bbdecoder.targets import TargetError

__all__ = [
    "AblationCAM",
    "CompletenessError",
    "EigenCAM",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "GradCAMPlusPlus",
    "Gradient",
    "HiResCAM",
    "InputXGradient",
    "IntegratedGradients",
    "KerasExplainer",
    "LayerCAM",
    "MonitorCallback",
    "ScoreCAM",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "SmoothGrad",
    "TargetError",
    "XGradCAM",
    "keras_baseline",
]
