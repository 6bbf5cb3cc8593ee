"""BBDecoder for TensorFlow/Keras 3: the attribution methods for functional, Sequential and subclassed
Keras models, through ``tf.GradientTape``, with the PyTorch side's names and meanings.

Inputs are channels last (N, *spatial, C); maps come back as tf.Tensors (N, *spatial, 1). Needs the
optional extra ``pip install bbdecoder[tensorflow]``; importing :mod:`bbdecoder` alone never imports
TensorFlow. Keras is made to use the TensorFlow backend unless ``KERAS_BACKEND`` says otherwise.
"""

from bbdecoder.keras._backend import keras, tf  # noqa: F401  (sets the environment first)
from bbdecoder.keras.base import KerasExplainer
from bbdecoder.keras.fullgrad import CompletenessError, FullGrad, FullGradDecomposition, SimpleFullGrad
from bbdecoder.keras.gradcam import GradCAM
from bbdecoder.keras.gradient import Gradient, InputXGradient
from bbdecoder.keras.integrated_gradients import IntegratedGradients, keras_baseline
from bbdecoder.keras.monitor import MonitorCallback
from bbdecoder.keras.smoothgrad import SmoothGrad
from bbdecoder.targets import TargetError

__all__ = [
    "CompletenessError",
    "FullGrad",
    "FullGradDecomposition",
    "GradCAM",
    "Gradient",
    "InputXGradient",
    "IntegratedGradients",
    "KerasExplainer",
    "MonitorCallback",
    "SimpleFullGrad",
    "SmoothGrad",
    "TargetError",
    "keras_baseline",
]
