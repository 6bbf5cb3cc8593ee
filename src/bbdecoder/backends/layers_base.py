"""The layer half of a backend: what the CAM family and FullGrad need from a framework.

The methods are written once, in torch, on channel-first tensors ``(N, C, *spatial)``. A layer backend
(one per framework: :mod:`bbdecoder.backends.layers_torch`, :mod:`bbdecoder.backends.layers_keras`)
does everything that touches the model:

* **layers**: resolve a selection (an object, a name, a glob, a leaf ID, a type, a list of these) and
  find the default CAM layer (the trunk's last feature map);
* **capture**: one forward pass (and, for gradient methods, one backward pass) that records the
  output of each chosen layer and the gradient of the target scores at that output (last call);
* **replacement**: forward passes with one layer's output replaced (Ablation-CAM) and plain scored
  forward passes of perturbed inputs (Score-CAM), without gradients;
* **bias layers**: every layer that adds a bias, the bias as it is *now*, and the gradient of the
  target at the tensor the bias was added to (before a fused activation), for FullGrad.

At the boundary the backend converts: inputs arrive in the framework's layout and leave as
channel-first torch tensors; layer outputs and gradients are handed over as torch tensors in the
layer's *own* layout (:meth:`LayerBackend.native_to_channel_first` moves Keras' channels-last maps),
and maps go back with :meth:`LayerBackend.to_native_map`. Targets are frozen as torch class
tensors ``(N,)`` (or kept as callables, which always see the framework's own outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bbdecoder.targets import TargetLike


@dataclass(frozen=True)
class LayerRef:
    """One layer of the model: its name (qualified name for torch, layer name for Keras) and object."""

    name: str
    layer: Any


@dataclass
class LayerCapture:
    """What one forward(+backward) saw at one layer (its last call), as torch tensors.

    ``output`` is the layer's output in the layer's own layout (channels last for a Keras conv map);
    ``gradient`` the target's gradient at it (``None`` for gradient-free captures); ``calls`` how many
    times the layer ran in that forward pass.
    """

    name: str
    layer: Any
    output: torch.Tensor
    gradient: torch.Tensor | None
    calls: int


@dataclass(frozen=True)
class Replacement:
    """Replace the output of ``layer`` at its ``call``-th call (1-based) with ``value`` (own layout)."""

    layer: Any
    call: int
    value: torch.Tensor


BiasHandler = Callable[[str, torch.Tensor, torch.Tensor], None]
"""``handler(layer name, bias broadcast to the output, dF/d output)`` for each call of a bias layer,
both in channel-first layout (channels on dim 1; a torch ``Linear`` keeps its features last)."""


class LayerBackend(Protocol):
    """What a framework provides to the CAM family and the FullGrad family (see the module doc)."""

    framework: str
    """``"torch"`` or ``"keras"``."""

    # -- boundary ---------------------------------------------------------------------------------
    def check_inputs(self, inputs: Any, min_dim: int) -> torch.Tensor:
        """A validated batch as a channel-first torch tensor ``(N, C, *spatial)``."""
        ...

    def to_native_map(self, maps: torch.Tensor) -> Any:
        """Maps ``(N, 1, *spatial)`` (or any channel-first tensor) in the framework's own type and layout."""
        ...

    def sample_shape(self, native: Sequence[int]) -> tuple[int, ...]:
        """One sample's shape as the user gives it (``im_size``) in channel-first order."""
        ...

    def native_to_channel_first(self, tensor: torch.Tensor, input_dims: int) -> torch.Tensor:
        """A layer's output (own layout) in channel-first layout when it is a feature map."""
        ...

    def reference_tensor(self) -> torch.Tensor:
        """A tensor with the model's dtype and device (for random probes)."""
        ...

    # -- layers -----------------------------------------------------------------------------------
    def find_layers(self, selection: Any) -> list[LayerRef]:
        """The layers ``selection`` names, in its order, without duplicates; a clear error otherwise."""
        ...

    def default_layers(self, cam: Any, inputs: torch.Tensor) -> list[LayerRef]:
        """The trunk's last feature map for ``inputs`` (one probe forward on the first sample)."""
        ...

    def capture(
        self, inputs: torch.Tensor, target: TargetLike, layers: Sequence[LayerRef], *, gradients: bool
    ) -> tuple[list[LayerCapture], TargetLike]:
        """One forward (+ backward when ``gradients``) recording each layer's last call.

        Returns the captures and the target frozen on this batch (classes ``(N,)`` or the callable).
        """
        ...

    def row_scores(
        self,
        batch: torch.Tensor,
        samples: torch.Tensor,
        target: TargetLike,
        replacement: Replacement | None = None,
    ) -> torch.Tensor:
        """Scores ``(rows,)`` of one forward pass of ``batch`` without gradients, optionally with one
        layer's output replaced; ``samples`` names the sample of each row (for per-sample targets).
        ``batch`` may have fewer rows than ``samples`` when the replacement has all ``rows`` (the layers
        below it run on those inputs once); a model that cannot take that raises."""
        ...

    def progress_session(self) -> Any:
        """A context for a sequence of :meth:`row_scores` calls (the model's modes held)."""
        ...

    # -- bias layers (FullGrad) -------------------------------------------------------------------
    def bias_layers(self) -> list[LayerRef]:
        """Every layer that may add a bias (conv, dense/linear, batch norm), found by type."""
        ...

    def model_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` after the input transform, outside any gradient (the decomposition's space)."""
        ...

    def backward_through_biases(
        self, x: torch.Tensor, target: TargetLike, handler: BiasHandler, *, strict: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """dF/dx shaped like ``x`` (the model input) and the scores ``(N,)``, calling ``handler`` once
        per bias-layer call. ``strict``: a layer whose biased (pre-activation) tensor cannot be found
        raises :class:`~bbdecoder.attribution.bias_layers.UnreachableBiasError`; otherwise its output
        is used (Simple FullGrad)."""
        ...


def resolve_layer_backend(explainer: Any, model: Any) -> LayerBackend:
    """The layer backend for ``model``: torch for an ``nn.Module``, Keras for a Keras layer or model."""
    import sys

    from torch import nn

    if isinstance(model, nn.Module):
        from bbdecoder.backends.layers_torch import TorchLayers

        return TorchLayers(explainer)
    if "keras" in sys.modules:  # a Keras model cannot exist before Keras is imported
        from bbdecoder.backends.layers_keras import KerasLayers, is_keras_model

        if is_keras_model(model):
            return KerasLayers(explainer)
    raise TypeError(f"expected a torch.nn.Module or a Keras 3 model, got {type(model).__name__}")


__all__ = [
    "BiasHandler",
    "LayerBackend",
    "LayerCapture",
    "LayerRef",
    "Replacement",
    "resolve_layer_backend",
]
