"""The dense quasi-Newton updates of :mod:`soo_func.directions.quasi_newton` as rank-one and
rank-two corrections (Nocedal & Wright, *Numerical Optimization*, 2nd ed., chapter 6).

Each update writes one fresh ``n x n`` buffer, ``scale * M`` (``M`` is never written), and
adds the correction ``L R^T = sum_k l_k r_k^T`` (``k <= 2``) to it in place, one rank-one
``addmm_`` per column: no other ``n x n`` temporary, ``O(n^2)`` time. A rejected pair (``ok``
false) gets zero columns, so the result is ``scale * M`` (the columns are zeroed, not their
coefficients: a rejected pair may hold NaN or inf, which a zero coefficient would not cancel).

The symmetric updates (BFGS, DFP, SR1) are written as ``sum_k sign_k p_k p_k^T``, i.e.
``l_k = sign_k p_k``, ``r_k = p_k``: each rank-one update adds ``sign_k (p_ik p_jk)`` to
entry ``(i, j)`` and the same product to ``(j, i)``, so a symmetric ``M`` gives an exactly
symmetric result (no rounding drift between ``H_ij`` and ``H_ji``): a rank-one update adds
one product per entry, where a rank-two ``gemm`` may sum its two products in a different
order for ``(i, j)`` than for ``(j, i)``. Where the correction is already a signed sum
of squares (BFGS's ``B``, DFP's ``H``, SR1) ``p_k`` is a column scaled by ``sqrt|coef|``;
the other two (BFGS's ``H``, DFP's ``B``) have the ``2 x 2`` coefficient matrix ``C`` on
``[a, M b]``, split by ``eigh`` on the normalized basis (``C = V diag(lam) V^T``,
``p_k = sqrt|lam_k| [a, M b] v_k``; the normalization keeps ``eigh``'s rounding relative to
the largest term, as in the textbook sum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree

__all__ = ["add_low_rank", "dense_curvature", "dense_update", "ratio_or_zero", "reset_where"]


def ratio_or_zero(num: torch.Tensor | float, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``ok``, else 0 (no division by a rejected denominator)."""
    num = torch.as_tensor(num, dtype=den.dtype, device=den.device)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def add_low_rank(matrix, left, right, ok, scale=None) -> torch.Tensor:
    """``scale * matrix + L R^T`` (``L``, ``R``: ``n x k``) in one fresh buffer, as ``k``
    rank-one ``addmm_`` (BLAS ``gemm`` of inner dimension 1) in place on it; ``L`` and ``R``
    are zeroed where ``ok`` fails. Inside a ``torch.func`` transform (where torch would loop
    over the batch for an in-place update) the out-of-place ``addmm`` makes a buffer per
    column."""
    left, right = torch.where(ok, left, 0.0), torch.where(ok, right, 0.0)
    new = matrix.clone() if scale is None else matrix * scale
    functorch = tree.in_functorch_transform()
    for k in range(left.shape[1]):
        column, row = left[:, k : k + 1], right[:, k : k + 1].mT
        new = torch.addmm(new, column, row) if functorch else new.addmm_(column, row)
    return new


def reset_where(matrix: torch.Tensor, keep: torch.Tensor, h0: float) -> torch.Tensor:
    """``matrix`` where ``keep`` (0-d bool), else ``h0 I``: the reset of a dense
    quasi-Newton matrix after a non-descent direction. Written into ``matrix`` (an update's
    fresh buffer), except where autograd records it (the direction's product saved it for
    the backward: ``adjoint="unrolled"``) or inside a ``torch.func`` transform: out of place
    there."""
    if matrix.requires_grad or tree.in_functorch_transform():
        matrix = matrix.masked_fill(~keep, 0.0)
    else:
        matrix = matrix.masked_fill_(~keep, 0.0)
    matrix.diagonal().add_(torch.where(keep, 0.0, h0))
    return matrix


def _squares(columns: list, coefs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``L = P diag(sign)``, ``R = P`` for ``sum_k coef_k c_k c_k^T``: ``p_k = sqrt|coef_k| c_k``."""
    coef = torch.stack(coefs)
    factors = torch.stack(columns, 1) * torch.sqrt(torch.abs(coef))
    return factors * torch.sign(coef), factors


def _normalized(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v / |v|, |v|)``, ``(v, 0)`` for ``v = 0``."""
    norm = torch.linalg.vector_norm(v)
    return v * ratio_or_zero(1.0, norm, norm > 0), norm


def _rank_two_product(a, m_b, b, ok) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of BFGS's ``H`` correction (N&W eq. 6.17 expanded; DFP's ``B``, eq. 6.13,
    is its dual with ``(a, b) = (y, s)``):
    ``-rho (a u^T + u a^T) + (rho^2 b^T u + rho) a a^T``, ``u = M b``, ``rho = 1 / a^T b``,
    i.e. ``C = [[rho^2 b^T u + rho, -rho], [-rho, 0]]`` on ``[a, u]``, split by ``eigh``."""
    rho = ratio_or_zero(1.0, a @ b, ok)
    a_hat, a_norm = _normalized(a)
    u_hat, u_norm = _normalized(m_b)
    c_aa = (rho * rho * (b @ m_b) + rho) * a_norm * a_norm
    c_au = -rho * a_norm * u_norm
    coefs = torch.stack([torch.stack([c_aa, c_au]), torch.stack([c_au, torch.zeros_like(c_au)])])
    lam, vecs = torch.linalg.eigh(torch.where(ok, coefs, 0.0))
    factors = torch.stack([a_hat, u_hat], 1) @ (vecs * torch.sqrt(torch.abs(lam)))
    return factors * torch.sign(lam), factors


def _symmetric_factors(method: str, inverse: bool, m_a, s, y, ok):
    """``(L, R)`` of the symmetric updates; ``m_a``: ``H y`` (inverse form) or ``B s``."""
    a, b = (y, s) if inverse else (s, y)
    if method == "sr1":  # N&W eqs. 6.24-6.25: M + r r^T / r^T a, r = b - M a
        residual = b - m_a
        return _squares([residual], [ratio_or_zero(1.0, residual @ a, ok)])
    if (method == "bfgs") == inverse:  # BFGS H (eq. 6.17), DFP B (eq. 6.13)
        return _rank_two_product(b, m_a, a, ok)
    # BFGS B (eq. 6.19), DFP H (eq. 6.15): M - (Ma)(Ma)^T / a^T M a + b b^T / a^T b.
    coefs = [-ratio_or_zero(1.0, a @ m_a, ok), ratio_or_zero(1.0, a @ b, ok)]
    return _squares([m_a, b], coefs)


def dense_update(method: str, form: str, matrix, s, y, ok, scale=None, product=None):
    """One quasi-Newton update of ``M = scale * matrix`` (``H`` or ``B``; ``scale`` a 0-d
    tensor, ``None`` for 1) by the pair ``(s, y)`` (Nocedal & Wright eqs. 6.13-6.25;
    Broyden's good update ``B + (y - Bs) s^T / s^T s``, eq. 11.24, and its Sherman-Morrison
    inverse ``H + (s - Hy) s^T H / s^T H y``). ``product``: ``M y`` (inverse form) or
    ``M s`` (direct form) when the caller has it. Returns a fresh tensor, ``M`` plus the
    correction where ``ok`` holds and ``M`` elsewhere; ``matrix`` is not written."""
    inverse = form == "inverse"
    if product is None:
        product = matrix @ (y if inverse else s)
        product = product if scale is None else scale * product
    if method != "broyden":
        left, right = _symmetric_factors(method, inverse, product, s, y, ok)
    elif not inverse:
        left, right = y - product, s * ratio_or_zero(1.0, s @ s, ok)
    else:
        s_m = s @ matrix if scale is None else scale * (s @ matrix)
        left, right = s - product, s_m * ratio_or_zero(1.0, s @ product, ok)
    if left.ndim == 1:
        left, right = left[:, None], right[:, None]
    return add_low_rank(matrix, left, right, ok, scale)


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
