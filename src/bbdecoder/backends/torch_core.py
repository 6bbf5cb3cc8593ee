"""The PyTorch backend: the explainer's own model call, session and autograd, behind the protocol.

It holds the :class:`~bbdecoder.attribution.base.Explainer` it serves and calls its ``forward`` and
``session``, so ``input_transform``, ``scores_from`` (the logits beneath a final softmax module),
``eval_mode`` and Captum's ``additional_forward_args`` mean exactly what they meant before.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bbdecoder.backends.base import Backend, FrozenTarget, Samples
from bbdecoder.targets import TargetLike, as_logits, select_scores

if TYPE_CHECKING:
    from bbdecoder.attribution.base import Explainer


class TorchBackend(Backend):
    """The backend of an ``nn.Module`` explainer (tensors stay channel-first torch tensors)."""

    framework: ClassVar[str] = "torch"

    def __init__(self, explainer: Explainer) -> None:
        self.explainer = explainer

    @property
    def model(self) -> Any:
        return self.explainer.model

    # -- layout ----------------------------------------------------------------------------------
    def prepare(self, inputs: Any, min_dim: int = 2) -> torch.Tensor:
        x = self.explainer.validate_inputs(inputs, min_dim).detach()
        return x.clone() if x.is_inference() else x

    def to_framework(self, value: torch.Tensor) -> Any:
        return value

    def from_framework(self, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor from the inner explainer, got {type(value).__name__}")
        return value

    # -- the model -------------------------------------------------------------------------------
    def session(self) -> contextlib.AbstractContextManager[Any]:
        return self.explainer.session()

    def logits(self, x: torch.Tensor, samples: Samples = None) -> torch.Tensor:
        with torch.no_grad():
            return as_logits(self._forward(x, samples), x.shape[0]).detach()

    def target_scores(self, x: torch.Tensor, target: FrozenTarget, samples: Samples = None) -> torch.Tensor:
        with torch.no_grad():
            output = self._forward(x, samples)
            return select_scores(output, target, x.shape[0]).detach()

    def input_gradient(
        self, x: torch.Tensor, target: TargetLike, samples: Samples = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from bbdecoder.attribution.base import leaf_input

        point = leaf_input(x)
        scores = select_scores(self._forward(point, samples), target, x.shape[0])
        (grad,) = torch.autograd.grad(scores.sum(), point)
        return grad, scores.detach()

    def _forward(self, x: torch.Tensor, samples: Samples) -> Any:
        try:
            return self.explainer.forward(x, samples)
        except Exception as err:
            # PyTorch layers accept unbatched (C, H, W) input, so a forgotten batch dimension often
            # fails deep inside the model with a message that does not say so.
            if x.dim() == 3 and hasattr(err, "add_note"):
                err.add_note(
                    "bbdecoder: the inputs have 3 dims; if this is one image (C, H, W), add the batch "
                    "dimension with x.unsqueeze(0)"
                )
            raise

    # -- memory ----------------------------------------------------------------------------------
    def activation_bytes_per_row(self, x: torch.Tensor) -> int:
        from bbdecoder.attribution.memory import activation_bytes_per_row

        return activation_bytes_per_row(self.explainer, x)


__all__ = ["TorchBackend"]
