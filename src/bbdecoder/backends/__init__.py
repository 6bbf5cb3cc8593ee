"""One backend per framework: what the attribution methods need from a model, and nothing else.

Every input-space method (Gradient, Integrated Gradients, SmoothGrad, GradientSHAP, the perturbation
methods) is written once, in PyTorch, on channel-first tensors, over the small protocol of
:class:`~bbdecoder.backends.base.Backend`. :mod:`~bbdecoder.backends.torch_core` runs it on an
``nn.Module``; :mod:`~bbdecoder.backends.keras_core` on a Keras 3 model through ``tf.GradientTape``
(imported only when a Keras explainer is made, so ``import bbdecoder`` never imports TensorFlow).
"""

from bbdecoder.backends.base import Backend, FrozenTarget

__all__ = ["Backend", "FrozenTarget"]
