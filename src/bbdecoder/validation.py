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
