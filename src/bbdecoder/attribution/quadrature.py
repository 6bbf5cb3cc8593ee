"""Quadrature rules on [0, 1] for path integrals (Integrated Gradients).

Every rule returns nodes ``alphas`` in [0, 1] and ``weights`` that sum to 1, so a constant integrand
is integrated exactly by every rule. Captum's trapezoid rule uses step ``1/n`` with halved ends, whose
weights sum to ``(n - 1)/n``; here the trapezoid step is ``1/(n - 1)`` (n nodes span n - 1 intervals).
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def quadrature(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of a quadrature rule on [0, 1].

    Args:
        method: one of ``riemann_left``, ``riemann_right``, ``riemann_middle``, ``riemann_trapezoid``
            (nodes ``linspace(0, 1, n)``, weights ``1/(n-1)`` with halved ends) or ``gausslegendre``.
        n_steps: number of nodes; at least 1 (2 for the trapezoid rule).

    Returns:
        ``(alphas, weights)``: two float64 CPU tensors of shape ``(n_steps,)``; ``weights.sum() == 1``
        up to float64 rounding.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quadrature method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise TypeError(f"n_steps must be an int, got {type(n_steps).__name__}")
    n = int(n_steps)
    minimum = 2 if method == "riemann_trapezoid" else 1
    if n < minimum:
        raise ValueError(f"{method} needs n_steps >= {minimum}, got {n}")

    if method == "gausslegendre":
        nodes, gauss_weights = np.polynomial.legendre.leggauss(n)
        alphas = torch.from_numpy(0.5 * (1.0 + nodes))
        weights = torch.from_numpy(0.5 * gauss_weights)
        return alphas.to(torch.float64), weights.to(torch.float64)

    index = torch.arange(n, dtype=torch.float64)
    if method == "riemann_trapezoid":
        alphas = index / (n - 1)
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[0] /= 2
        weights[-1] /= 2
        return alphas, weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[method]
    alphas = (index + offset) / n
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return alphas, weights
