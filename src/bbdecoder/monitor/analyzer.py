"""Analyzer (alias ``Master_analyzer``): watch a model train and record what happens inside.

The analyzer only reads: gradients after backward, weights, and (opt-in) layer outputs through
forward hooks. Training with it attached gives bit-identical weights to training without it.
Everything goes to the run store in ``save_path`` (see :mod:`bbdecoder.store`).

Where its parts live: :mod:`~bbdecoder.monitor.seed` (the class and the seed's calls),
:mod:`~bbdecoder.monitor.core` (construction, steps, epochs, lifetime), :mod:`~bbdecoder.monitor.capture`
(the PyTorch capture) and :mod:`~bbdecoder.monitor.recorder` (the store rows, shared with Keras).
"""

from bbdecoder.monitor.core import EmptyEpochError, TorchMonitor
from bbdecoder.monitor.recorder import NonFiniteGradientWarning
from bbdecoder.monitor.seed import Analyzer, Master_analyzer

__all__ = ["Analyzer", "EmptyEpochError", "Master_analyzer", "NonFiniteGradientWarning", "TorchMonitor"]
