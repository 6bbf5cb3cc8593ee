"""What an explainer scores: the logits, also beneath a final softmax or sigmoid.

Attributions explain logits: FullGrad's decomposition and IG's completeness are linear in them, and a
softmax couples every class into each score. Many models end in a probability layer anyway
(``nn.Sequential(..., nn.Softmax(dim=1))``, classifiers exported for inference). With
``scores_from="logits"`` (the default everywhere) the model is run as it is and:

* **a final probability module is explained through its input.** Every ``nn.Softmax``,
  ``nn.LogSoftmax``, ``nn.Softmax2d`` and ``nn.Sigmoid`` in the model is watched with a forward hook;
  when the tensor the model returns (or its ``logits`` entry) *is* the output of the last call of one
  of them, the input of that call, the logits, is used instead. Nothing else changes: the same forward
  pass, the same graph.
* **a probability output without such a module is refused** (:class:`ProbabilityOutputError`): a
  ``F.softmax`` / ``torch.log_softmax`` inside ``forward`` leaves no module to find, so the returned
  scores are tested: ``(N, C)`` rows with C >= 2 that are all in [0, 1] and sum to 1 (softmax), or are
  all <= 0 with ``logsumexp == 0`` (log-softmax), to 1e-4 relative. Real logits essentially never
  pass that test; probabilities always do. A functional ``torch.sigmoid`` cannot be told from logits
  that happen to lie in (0, 1), so it is *not* detected: end the model in ``nn.Sigmoid()`` or return
  logits.

``scores_from="output"`` explains what the model returns, probabilities included.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bbdecoder.hooks import HookManager
from bbdecoder.targets import logits_entry

PROBABILITY_MODULES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.Sigmoid)
SCORES_FROM = ("logits", "output")
_PROBABILITY_TOLERANCE = 1e-4


class ProbabilityOutputError(ValueError):
    """The model returns probabilities and the logits beneath them cannot be reached."""


def check_scores_from(value: Any) -> str:
    if value not in SCORES_FROM:
        raise ValueError(f"scores_from must be one of {', '.join(map(repr, SCORES_FROM))}, got {value!r}")
    return str(value)


def model_output(model: nn.Module, x: Any, scores_from: str = "logits") -> Any:
    """``model(x)``, with a final probability module's output replaced by the logits it was given.

    ``scores_from="output"``: ``model(x)`` as it is. See the module docstring for what is detected.
    """
    if scores_from == "output":
        return model(x)
    heads = [
        (name, module) for name, module in model.named_modules() if isinstance(module, PROBABILITY_MODULES)
    ]
    last: list[tuple[str, nn.Module, Any, Any]] = []
    with HookManager() as hooks:
        for name, module in heads:

            def record(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
                last[:] = [(name, module, args[0] if args else None, output)]

            hooks.forward_hook(module, record)
        output = model(x)
    scores = logits_entry(output)
    if scores is None:
        return output
    if last and last[0][3] is scores and isinstance(last[0][2], torch.Tensor):
        return _replace_scores(output, last[0][2])
    kind = probability_kind(scores)
    if kind is not None:
        raise ProbabilityOutputError(
            f"the model's output looks like {kind} probabilities (every row sums to 1 over "
            f"{scores.shape[1]} classes) but no final nn.Softmax/nn.LogSoftmax/nn.Sigmoid module produced "
            "it, so the logits beneath cannot be reached (a F.softmax inside forward?). Explanations of "
            "probabilities couple every class; return the logits from forward (or end the model in an "
            "nn.Softmax module, whose input is then explained), or pass scores_from='output' to explain "
            "the probabilities as they are"
        )
    return output


def probability_kind(scores: torch.Tensor) -> str | None:
    """``"softmax"`` / ``"log-softmax"`` when the (N, C >= 2) rows are probabilities, else ``None``."""
    if scores.dim() != 2 or scores.shape[1] < 2 or not scores.dtype.is_floating_point or scores.numel() == 0:
        return None
    values = scores.detach()
    if not bool(torch.isfinite(values).all()):
        return None
    sums = values.double().sum(dim=1)
    if bool((values >= 0).all() and (values <= 1).all()) and bool(
        ((sums - 1).abs() <= _PROBABILITY_TOLERANCE).all()
    ):
        return "softmax"
    if bool((values <= 0).all()):
        logsumexp = values.double().logsumexp(dim=1)
        if bool((logsumexp.abs() <= _PROBABILITY_TOLERANCE).all()):
            return "log-softmax"
    return None


def _replace_scores(output: Any, logits: torch.Tensor) -> Any:
    """``output`` with its score tensor (itself, or its ``logits`` entry) replaced by ``logits``."""
    if isinstance(output, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        replaced = copy.copy(output)
        replaced["logits"] = logits  # type: ignore[index]
        if hasattr(replaced, "logits"):
            object.__setattr__(replaced, "logits", logits)
        return replaced
    if hasattr(output, "_replace"):
        return output._replace(logits=logits)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return dataclasses.replace(output, logits=logits)
    return output
