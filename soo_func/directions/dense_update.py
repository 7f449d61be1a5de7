"""The dense quasi-Newton updates of :mod:`soo_func.directions.quasi_newton` as rank-one and
rank-two corrections (Nocedal & Wright, *Numerical Optimization*, 2nd ed., chapter 6).

Each update is one ``torch.addmm`` of the ``n x n`` matrix with two thin ``n x 2``
factors: the matrix is read once and the result written once, with no ``n x n``
temporary (BLAS ``gemm`` with an inner dimension of at most 2).
"""

from __future__ import annotations

import torch

__all__ = ["dense_update", "low_rank_update", "ratio_or_zero"]


def ratio_or_zero(num: torch.Tensor | float, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``ok``, else 0 (no division by a rejected denominator)."""
    num = torch.as_tensor(num, dtype=den.dtype, device=den.device)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def low_rank_update(matrix, left: list, right: list, ok) -> torch.Tensor:
    """``matrix + L R^T`` (``L``, ``R``: ``n x k`` from the columns ``left``, ``right``; k <= 2)
    in one ``addmm``: one read of ``matrix`` and one write of a fresh result, no ``n x n``
    temporary (BLAS ``gemm`` with an inner dimension of ``k``). Where ``ok`` fails the
    columns are zeroed first, so that the result is ``matrix`` (a rejected pair may hold
    NaN or inf, which a zero coefficient would not cancel)."""
    left_cols = torch.where(ok, torch.stack(left, 1), 0.0)
    right_cols = torch.where(ok, torch.stack(right, 1), 0.0)
    return torch.addmm(matrix, left_cols, right_cols.T)


def dense_update(method: str, form: str, matrix, s, y, ok):
    """One quasi-Newton update of ``matrix`` (``H`` or ``B``) by the pair ``(s, y)``, as a
    rank-one or rank-two correction (:func:`low_rank_update`).

    * BFGS ``H`` (N&W eq. 6.17): ``H + [s, Hy] [[c, -rho], [-rho, 0]] [s, Hy]^T``,
      ``rho = 1 / s^T y``, ``c = rho^2 y^T H y + rho``; DFP ``B`` is its dual (``s <-> y``).
    * BFGS ``B`` (eq. 6.19) and DFP ``H`` (eq. 6.15): ``M - (Ma)(Ma)^T / a^T M a + b b^T / a^T b``
      with ``(a, b) = (s, y)`` for ``B``, ``(y, s)`` for ``H``.
    * SR1 (eqs. 6.24-6.25): ``M + r r^T / r^T a``, ``r = b - M a``.
    * Broyden's good update ``B + (y - Bs) s^T / s^T s`` and its inverse by
      Sherman-Morrison, ``H + (s - Hy) s^T H / s^T H y``.

    Returns the updated matrix where ``ok`` holds (``matrix`` unchanged elsewhere).
    """
    inverse = form == "inverse"
    if method in ("bfgs", "dfp") and inverse == (method == "bfgs"):
        a, b = (s, y) if method == "bfgs" else (y, s)  # H for BFGS, B for DFP
        mb = matrix @ b
        rho = ratio_or_zero(torch.ones_like(a @ b), a @ b, ok)
        c = rho * rho * (b @ mb) + rho
        return low_rank_update(matrix, [a, mb], [c * a - rho * mb, -rho * a], ok)
    if method in ("bfgs", "dfp"):
        a, b = (y, s) if inverse else (s, y)
        ma = matrix @ a
        left = [ma, b]
        return low_rank_update(
            matrix,
            left,
            [-ratio_or_zero(1.0, a @ ma, ok) * ma, ratio_or_zero(1.0, a @ b, ok) * b],
            ok,
        )
    if method == "sr1":
        a, b = (y, s) if inverse else (s, y)
        residual = b - matrix @ a
        return low_rank_update(
            matrix, [residual], [ratio_or_zero(1.0, residual @ a, ok) * residual], ok
        )
    if not inverse:
        return low_rank_update(matrix, [y - matrix @ s], [ratio_or_zero(1.0, s @ s, ok) * s], ok)
    hy = matrix @ y
    return low_rank_update(matrix, [s - hy], [ratio_or_zero(1.0, s @ hy, ok) * (s @ matrix)], ok)
