"""Argument checks shared by the PyTorch and Keras sides (framework-free)."""

from __future__ import annotations

from typing import Any

SMOOTHGRAD_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def is_positive_int(value: Any) -> bool:
    """True for an ``int`` >= 1 (``bool`` is not accepted as an int here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_positive_int(value: Any, name: str, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a positive int (or ``None`` if optional)."""
    if optional and value is None:
        return
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_smoothgrad_settings(n_samples: Any, noise_level: Any, kind: str, internal_batch_size: Any) -> None:
    """The constructor arguments of SmoothGrad, on either framework."""
    check_positive_int(n_samples, "n_samples")
    if not noise_level >= 0:
        raise ValueError(f"noise_level must be >= 0 (a fraction of the range), got {noise_level}")
    if kind not in SMOOTHGRAD_KINDS:
        raise ValueError(f"unknown SmoothGrad kind {kind!r}; choose one of {', '.join(SMOOTHGRAD_KINDS)}")
    check_positive_int(internal_batch_size, "internal_batch_size", optional=True)


def check_batch(inputs: Any, *, min_dim: int = 2, model: Any = None, finite: bool = True) -> Any:
    """Validate a PyTorch batch once, before any probe pass: return it, or raise naming the fix.

    Checks, in order: a tensor; floating point; at least ``min_dim`` dims; a non-empty batch; when
    ``model`` is given, that the inputs are not one sample without its batch dimension (see
    :func:`missing_batch_dim`); and with ``finite``, that no value is NaN or infinite (the maps of such
    inputs look plausible and mean nothing).
    """
    import torch

    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not inputs.dtype.is_floating_point:
        raise TypeError(
            f"inputs must be floating point (gradients need it), got {inputs.dtype}; use .float()"
        )
    if inputs.dim() < min_dim:
        raise ValueError(
            f"inputs must be a batch (N, ...) with at least {min_dim} dims, got shape {tuple(inputs.shape)}; "
            "add the batch dimension with x.unsqueeze(0)"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch (N = 0)")
    if model is not None:
        problem = missing_batch_dim(model, tuple(inputs.shape))
        if problem:
            raise ValueError(problem)
    if finite:
        finite_mask = torch.isfinite(inputs)
        if not bool(finite_mask.all()):
            n_nan = int(torch.isnan(inputs).sum())
            n_inf = int(inputs.numel() - finite_mask.sum()) - n_nan
            raise ValueError(
                f"inputs contain {n_nan} NaN and {n_inf} infinite values (shape {tuple(inputs.shape)}); "
                "attributions of non-finite inputs are meaningless. Clean or drop those samples first "
                "(e.g. torch.nan_to_num(x), or x[torch.isfinite(x).flatten(1).all(1)])"
            )
    return inputs


def missing_batch_dim(model: Any, shape: tuple[int, ...]) -> str | None:
    """A message when ``shape`` looks like one sample of ``model`` without its batch dimension, else None.

    The model's first convolution (in registration order) tells the sample layout: a ``Conv2d`` taking
    C > 1 channels expects ``(N, C, H, W)``; inputs ``(C, H, W)`` (one dim short, leading size C) are
    one image. Torch's convolutions accept such unbatched input, so without this check the error comes
    from deep inside the model, or from a probe pass that sliced the channel axis. Single-channel
    models are not judged (a ``(1, H, W)`` batch of one may be what a model that adds its own channel
    axis expects); their failures get a note instead.
    """
    from torch.nn.modules.conv import _ConvNd

    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            channels = int(module.in_channels)
            spatial = len(module.kernel_size)
            if channels > 1 and len(shape) == spatial + 1 and shape[0] == channels:
                layout = ("C", "H", "W", "D")[: spatial + 1] if spatial <= 3 else ("C", "...")
                return (
                    f"inputs of shape {shape} look like one sample ({', '.join(layout)}) without its batch "
                    f"dimension: the model's first convolution {name!r} takes {channels} channels and "
                    f"{spatial}-D inputs (N, {channels}, ...). Add the batch dimension with x.unsqueeze(0)"
                )
            return None
    return None
