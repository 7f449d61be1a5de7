"""The dense quasi-Newton updates of :mod:`soo_func.directions.quasi_newton` as rank-one and
rank-two corrections (Nocedal & Wright, *Numerical Optimization*, 2nd ed., chapter 6).

Each update costs ``O(n^2)``: matrix-vector products and outer products, no dense solve
(the inverse form never factorizes). The corrections are evaluated in the order of the
textbook formulas (a fused rank-two ``addmm`` was measured 4x faster per iteration, but
changes the rounding of slow, chaotic runs such as Broyden's on ill-conditioned problems).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree

__all__ = ["dense_curvature", "dense_update", "ratio_or_zero"]


def ratio_or_zero(num: torch.Tensor | float, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``ok``, else 0 (no division by a rejected denominator)."""
    num = torch.as_tensor(num, dtype=den.dtype, device=den.device)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def dense_update(method: str, form: str, matrix, s, y, ok):
    """One quasi-Newton update of ``matrix`` (``H`` or ``B``) by the pair ``(s, y)``
    (Nocedal & Wright eqs. 6.15-6.25; Broyden's good update and its Sherman-Morrison
    inverse). Returns the updated matrix where ``ok`` holds (``matrix`` unchanged elsewhere).
    """
    inverse = form == "inverse"
    if method == "bfgs" and inverse:
        hy = matrix @ y
        rho = ratio_or_zero(torch.ones_like(s @ y), s @ y, ok)
        new = (
            matrix
            - rho * (torch.outer(s, hy) + torch.outer(hy, s))
            + (rho * rho * (y @ hy) + rho) * torch.outer(s, s)
        )
    elif method == "bfgs" or (method == "dfp" and inverse):
        # B+ = B - Bs (Bs)^T / s^T B s + y y^T / y^T s, and its dual for DFP's H.
        a, b = (y, s) if inverse else (s, y)
        ma = matrix @ a
        new = (
            matrix
            - ratio_or_zero(1.0, a @ ma, ok) * torch.outer(ma, ma)
            + ratio_or_zero(1.0, a @ b, ok) * torch.outer(b, b)
        )
    elif method == "dfp":
        by = matrix @ s
        rho = ratio_or_zero(torch.ones_like(s @ y), s @ y, ok)
        new = (
            matrix
            - rho * (torch.outer(y, by) + torch.outer(by, y))
            + (rho * rho * (s @ by) + rho) * torch.outer(y, y)
        )
    elif method == "sr1":
        a, b = (y, s) if inverse else (s, y)
        residual = b - matrix @ a
        new = matrix + ratio_or_zero(1.0, residual @ a, ok) * torch.outer(residual, residual)
    elif method == "broyden" and not inverse:
        new = matrix + ratio_or_zero(1.0, s @ s, ok) * torch.outer(y - matrix @ s, s)
    else:
        hy = matrix @ y
        new = matrix + ratio_or_zero(1.0, s @ hy, ok) * torch.outer(s - hy, s @ matrix)
    return torch.where(ok, new, matrix)


def dense_curvature(matrix: torch.Tensor, params: Any, inverse: bool) -> Callable[[Any], Any]:
    """The published ``curvature`` of a dense quasi-Newton matrix: ``v -> B v`` on pytrees
    like ``params``, solving ``H x = v`` when ``matrix`` is the inverse ``H`` (direct form:
    one product)."""

    def curvature(v: Any) -> Any:
        flat = tree.ravel(v).flat
        small = flat.to(matrix.dtype)
        out = torch.linalg.solve_ex(matrix, small)[0] if inverse else matrix @ small
        return tree.unravel(out.to(flat.dtype), params)

    return curvature
