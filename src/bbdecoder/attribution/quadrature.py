"""Quadrature rules on [0, 1] for path integrals (Integrated Gradients).

Every rule returns nodes ``alphas`` in [0, 1] and ``weights`` that sum to 1, so a constant integrand
is integrated exactly by every rule. Captum's trapezoid rule uses step ``1/n`` with halved ends, whose
weights sum to ``(n - 1)/n``; here the trapezoid step is ``1/(n - 1)`` (n nodes span n - 1 intervals).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


MAX_STEPS = 1_000_000
"""Most nodes a rule may have: 20,000 x the default of 50. More would take days of forward passes."""
MAX_GAUSS_LEGENDRE_STEPS = 1024
"""Gauss-Legendre nodes come from an n x n eigenproblem (about 2 s at 1024, 13 s at 2000)."""


@functools.lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    nodes.flags.writeable = False
    weights.flags.writeable = False
    return nodes, weights


def check_quadrature(method: str, n_steps: int) -> int:
    """Validate a rule and its node count before anything is allocated; returns ``n_steps`` as an int."""
    if method not in METHODS:
        raise ValueError(f"unknown quadrature method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    n = int(n_steps)
    minimum = 2 if method == "riemann_trapezoid" else 1
    if n < minimum:
        raise ValueError(f"{method} needs n_steps >= {minimum}, got {n}")
    if n > MAX_STEPS:
        raise ValueError(
            f"n_steps={n} is more than {MAX_STEPS:,} path points; each costs a forward and a backward pass "
            "per sample. IG converges long before that: check the convergence delta at 50-300 steps"
        )
    if method == "gausslegendre" and n > MAX_GAUSS_LEGENDRE_STEPS:
        raise ValueError(
            f"gausslegendre supports at most {MAX_GAUSS_LEGENDRE_STEPS} nodes (its nodes come from an "
            f"n x n eigenproblem), got {n}; use a Riemann rule (e.g. riemann_trapezoid) for more steps"
        )
    return n


def quadrature(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of a quadrature rule on [0, 1].

    Args:
        method: one of ``riemann_left``, ``riemann_right``, ``riemann_middle``, ``riemann_trapezoid``
            (nodes ``linspace(0, 1, n)``, weights ``1/(n-1)`` with halved ends) or ``gausslegendre``.
        n_steps: number of nodes; at least 1 (2 for the trapezoid rule), at most :data:`MAX_STEPS`
            (:data:`MAX_GAUSS_LEGENDRE_STEPS` for ``gausslegendre``).

    Returns:
        ``(alphas, weights)``: two float64 CPU tensors of shape ``(n_steps,)``; ``weights.sum() == 1``
        up to float64 rounding.
    """
    n = check_quadrature(method, n_steps)
    return quadrature_slice(method, n, 0, n)


def quadrature_slice(method: str, n_steps: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``start..stop-1`` of :func:`quadrature` and their weights, without building the others.

    Bitwise equal to ``quadrature(method, n_steps)[k][start:stop]``; Gauss-Legendre rules (at most
    :data:`MAX_GAUSS_LEGENDRE_STEPS` nodes) are computed whole and sliced.
    """
    n = check_quadrature(method, n_steps)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"node slice {start}:{stop} is outside 0:{n}")
    if method == "gausslegendre":
        nodes, gauss_weights = _gauss_legendre(n)
        alphas = torch.from_numpy(0.5 * (1.0 + nodes))
        weights = torch.from_numpy(0.5 * gauss_weights)
        return alphas.to(torch.float64)[start:stop], weights.to(torch.float64)[start:stop]

    index = torch.arange(start, stop, dtype=torch.float64)
    if method == "riemann_trapezoid":
        alphas = index / (n - 1)
        weights = torch.full((stop - start,), 1.0 / (n - 1), dtype=torch.float64)
        weights[index == 0] /= 2
        weights[index == n - 1] /= 2
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    alphas = (index + offset) / n
    weights = torch.full((stop - start,), 1.0 / n, dtype=torch.float64)
    return alphas, weights
