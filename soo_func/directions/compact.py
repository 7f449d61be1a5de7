"""Compact (limited-memory) representations of quasi-Newton matrices.

Byrd, Nocedal & Schnabel, "Representations of quasi-Newton matrices and their use in
limited memory methods", Math. Programming 63 (1994). With the pairs ``S = [s_i]``,
``Y = [y_i]`` (oldest first), ``D = diag(s_i^T y_i)``, ``L = tril(S^T Y, -1)``,
``R = triu(S^T Y)``, ``B0 = sigma I`` and ``H0 = gamma I``:

* BFGS, direct (BNS Thm 2.3, N&W eq. 7.24):
  ``B = sigma I - [sigma S, Y] [[sigma S^T S, L], [L^T, -D]]^{-1} [sigma S, Y]^T``.
* BFGS, inverse (BNS Thm 2.2, eq. 2.6):
  ``H = gamma I + [S, gamma Y] [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]] [S, gamma Y]^T``.
* DFP: the BFGS formulas with ``s <-> y`` and ``B <-> H`` (the dual update).
* SR1 (BNS Thm 5.1): ``B = sigma I + (Y - sigma S)(D + L + L^T - sigma S^T S)^{-1}(Y - sigma S)^T``,
  ``H = gamma I + (S - gamma Y)(R + R^T - D - gamma Y^T Y)^{-1}(S - gamma Y)^T``.
* Broyden's (good) rank-one update (BNS section 6): ``B = sigma I + (Y - sigma S) N^{-1} S^T``,
  ``N = triu(S^T S)``; its inverse by Sherman-Morrison-Woodbury,
  ``H = gamma I + (S - gamma Y)(gamma S^T Y - tril(S^T S, -1))^{-1} gamma S^T``.

Each formula is stored as a *kernel* ``F`` (``2m x 2m``) with
``M v = identity_coef v + [S Y] F [S^T v; Y^T v]`` (``identity_coef`` is ``sigma`` of
``B0 = sigma I`` or ``gamma`` of ``H0 = gamma I``), computed from the Gram matrix of
``[S Y]`` only. :func:`kernel_apply` multiplies by ``M``; :func:`kernel_solve` solves
``M x = v`` with one small dense solve (``x = v / identity_coef + [S Y] c``,
``(identity_coef I + F G) c = -F [S^T v; Y^T v] / identity_coef``), which is how the
*direct* forms produce their direction ``-B^{-1} g`` matrix-free. Invalid (skipped or empty) slots
get identity rows in the middle matrices and zero rows in ``F``.

The inverse BFGS product ``H g`` is taken by the two-loop recursion instead (N&W Alg. 7.4,
:func:`two_loop_coefficients`, the one L-BFGS kernel), with ``H0 = gamma I`` of eq. 7.20
(:func:`newest_gamma`). It is evaluated in its *vector-free* arrangement (Chen, Wang & Zhou,
"Large-scale L-BFGS using MapReduce", NeurIPS 2014): every inner product it takes is a
combination of ``S^T g``, ``Y^T g`` and the Gram matrix, so it reads the long vectors only
for those products and for the final combination ``gamma g + S c_s + Y c_y``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree
from soo_func.directions import pair_memory as pm

__all__ = [
    "KERNELS",
    "bfgs_direct_kernel",
    "bfgs_inverse_kernel",
    "broyden_direct_kernel",
    "broyden_inverse_kernel",
    "dfp_direct_kernel",
    "dfp_inverse_kernel",
    "kernel_apply",
    "kernel_operator",
    "kernel_solve",
    "newest_gamma",
    "sr1_direct_kernel",
    "sr1_inverse_kernel",
    "two_loop_coefficients",
]

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _blocks(gram: torch.Tensor):
    m = gram.shape[0] // 2
    return gram[:m, :m], gram[:m, m:], gram[m:, m:]


def _with_identity(matrix: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace the rows and columns of invalid indices by those of the identity."""
    keep = valid[:, None] & valid[None, :]
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return torch.where(keep, matrix, eye)


def _mask(kernel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    both = torch.cat([valid, valid])
    keep = both[:, None] & both[None, :]
    return torch.where(keep, kernel, torch.zeros_like(kernel))


def _solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """A dense solve without the error check (which would sync with a GPU)."""
    return torch.linalg.solve_ex(matrix, rhs)[0]


def _eye(m: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(m, dtype=like.dtype, device=like.device)


def bfgs_direct_kernel(gram: torch.Tensor, valid: torch.Tensor, sigma: torch.Tensor):
    """Kernel of the compact direct BFGS matrix ``B`` (BNS eq. 2.17) with ``B0 = sigma I``."""
    ss, sy, _ = _blocks(gram)
    m = ss.shape[0]
    lower = torch.tril(sy, -1)
    middle = torch.cat(
        [
            torch.cat([sigma * ss, lower], 1),
            torch.cat([lower.T, -torch.diag(torch.diagonal(sy))], 1),
        ]
    )
    both = torch.cat([valid, valid])
    middle = _with_identity(middle, both)
    block_weights = torch.cat([sigma.expand(m), torch.ones_like(sigma).expand(m)])
    kernel = -block_weights[:, None] * _solve(middle, torch.diag(block_weights))
    return _mask(kernel, valid)


def bfgs_inverse_kernel(gram: torch.Tensor, valid: torch.Tensor, gamma: torch.Tensor):
    """Kernel of the compact inverse BFGS matrix ``H`` (BNS eq. 2.6) with ``H0 = gamma I``."""
    _, sy, yy = _blocks(gram)
    m = sy.shape[0]
    eye = _eye(m, gram)
    upper = _with_identity(torch.triu(sy), valid)
    r_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
    d_yy = torch.diag(
        torch.where(valid, torch.diagonal(sy), torch.zeros_like(valid, dtype=sy.dtype))
    )
    top_left = r_inv.T @ (d_yy + gamma * yy) @ r_inv
    middle = torch.cat(
        [torch.cat([top_left, -r_inv.T], 1), torch.cat([-r_inv, torch.zeros_like(eye)], 1)]
    )
    block_weights = torch.cat([torch.ones_like(gamma).expand(m), gamma.expand(m)])
    return _mask(block_weights[:, None] * middle * block_weights[None, :], valid)


def _swap(matrix: torch.Tensor) -> torch.Tensor:
    """Exchange the S and Y blocks of a ``2m x 2m`` matrix (the BFGS/DFP duality)."""
    m = matrix.shape[0] // 2
    perm = torch.cat([torch.arange(m, 2 * m), torch.arange(m)]).to(matrix.device)
    return matrix[perm][:, perm]


def dfp_inverse_kernel(gram: torch.Tensor, valid: torch.Tensor, gamma: torch.Tensor):
    """DFP's ``H``: the direct BFGS formula with ``s <-> y`` (``H0 = gamma I``)."""
    return _swap(bfgs_direct_kernel(_swap(gram), valid, gamma))


def dfp_direct_kernel(gram: torch.Tensor, valid: torch.Tensor, sigma: torch.Tensor):
    """DFP's ``B``: the inverse BFGS formula with ``s <-> y`` (``B0 = sigma I``)."""
    return _swap(bfgs_inverse_kernel(_swap(gram), valid, sigma))


def _rank_kernel(left: torch.Tensor, middle_inv: torch.Tensor, right: torch.Tensor, valid):
    return _mask(left @ middle_inv @ right.T, valid)


def sr1_direct_kernel(gram: torch.Tensor, valid: torch.Tensor, sigma: torch.Tensor):
    """Kernel of the compact SR1 ``B`` (BNS eq. 5.2) with ``B0 = sigma I``."""
    ss, sy, _ = _blocks(gram)
    m = ss.shape[0]
    lower = torch.tril(sy, -1)
    middle = torch.diag(torch.diagonal(sy)) + lower + lower.T - sigma * ss
    eye = _eye(m, gram)
    factor = torch.cat([-sigma * eye, eye])  # Y - sigma S = [S Y] factor
    inv = _solve(_with_identity(middle, valid), eye)
    return _rank_kernel(factor, inv, factor, valid)


def sr1_inverse_kernel(gram: torch.Tensor, valid: torch.Tensor, gamma: torch.Tensor):
    """Kernel of the compact SR1 ``H`` (BNS eq. 5.3) with ``H0 = gamma I``."""
    _, sy, yy = _blocks(gram)
    m = sy.shape[0]
    upper = torch.triu(sy)
    middle = upper + upper.T - torch.diag(torch.diagonal(sy)) - gamma * yy
    eye = _eye(m, gram)
    factor = torch.cat([eye, -gamma * eye])  # S - gamma Y
    inv = _solve(_with_identity(middle, valid), eye)
    return _rank_kernel(factor, inv, factor, valid)


def broyden_direct_kernel(gram: torch.Tensor, valid: torch.Tensor, sigma: torch.Tensor):
    """Kernel of Broyden's compact ``B = sigma I + (Y - sigma S) triu(S^T S)^{-1} S^T``."""
    ss, _, _ = _blocks(gram)
    m = ss.shape[0]
    eye = _eye(m, gram)
    upper = _with_identity(torch.triu(ss), valid)
    inv = torch.linalg.solve_triangular(upper, eye, upper=True)
    left = torch.cat([-sigma * eye, eye])
    right = torch.cat([eye, torch.zeros_like(eye)])
    return _rank_kernel(left, inv, right, valid)


def broyden_inverse_kernel(gram: torch.Tensor, valid: torch.Tensor, gamma: torch.Tensor):
    """Kernel of the inverse of Broyden's compact ``B`` (Sherman-Morrison-Woodbury)."""
    ss, sy, _ = _blocks(gram)
    m = ss.shape[0]
    eye = _eye(m, gram)
    middle = gamma * sy - torch.tril(ss, -1)
    inv = _solve(_with_identity(middle, valid), eye)
    left = torch.cat([eye, -gamma * eye])
    right = torch.cat([gamma * eye, torch.zeros_like(eye)])
    return _rank_kernel(left, inv, right, valid)


def newest_gamma(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``gamma = s^T y / y^T y`` of the newest valid pair with ``s^T y > 0`` (N&W eq. 7.20),
    else 1. (Pairs kept by the BFGS skip rule always have ``s^T y > 0``.)"""
    m = valid.shape[0]
    sy, yy = torch.diagonal(gram[:m, m:]), torch.diagonal(gram[m:, m:])
    usable = valid & (sy > 0) & (yy > 0)
    ratio = sy / torch.where(usable, yy, torch.ones_like(yy))
    order = torch.arange(1, m + 1, device=valid.device) * usable
    newest = torch.argmax(order, dim=0, keepdim=True)  # [1]: a gather, not a host index
    return torch.where(usable.any(), ratio.gather(0, newest)[0], torch.ones_like(ratio[0]))


def two_loop_coefficients(
    gram: torch.Tensor,
    valid: torch.Tensor,
    sg: torch.Tensor,
    yg: torch.Tensor,
    gamma: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Coefficients ``[c_s; c_y]`` with ``H g = gamma g + S c_s + Y c_y`` (N&W Alg. 7.4).

    ``gram`` is the Gram matrix of ``[S, Y]`` (``2m x 2m``; only ``triu(S^T Y)`` and
    ``Y^T Y`` are read), ``sg = S^T g``, ``yg = Y^T g``; ``H0 = gamma I``. Invalid slots get
    ``rho = 0`` and drop out of both loops. With ``rho_i = 1 / s_i^T y_i`` the first loop
    ``alpha_i = rho_i s_i^T (g - sum_{j>i} alpha_j y_j)`` is the unit upper-triangular
    system ``(I + diag(rho) triu(S^T Y, 1)) alpha = rho * S^T g``; the second loop
    ``beta_i = rho_i y_i^T r_i``, ``r_i = gamma q + sum_{j<i} (alpha_j - beta_j) s_j``,
    ``q = g - Y alpha``, is the unit lower-triangular system
    ``(I + diag(rho) L) beta = rho * (gamma (Y^T g - Y^T Y alpha) + L alpha)``,
    ``L = tril(Y^T S, -1)``. Forward substitution performs the loops' arithmetic, and
    ``H g = gamma g - gamma Y alpha + S (alpha - beta)``.

    ``weights`` (``[m]``, default all ones) scale each pair's own rank-one term in the
    second loop, ``r_{i+1} = r_i + s_i (w_i alpha_i - beta_i)``: the matrix is then
    ``H = gamma V^T...V + sum_i w_i V_{>i}^T rho_i s_i s_i^T V_{>i}``, the unrolled
    self-scaled BFGS of :mod:`soo_func.directions.self_scaled_memory` (``w_i`` the product
    of the later ``1/tau_j``; ``gamma`` there already carries the product of all of them).
    """
    m = valid.shape[0]
    sy = gram[:m, m:]
    yy = gram[m:, m:]
    diag = torch.diagonal(sy)
    safe = torch.where(valid, diag, torch.ones_like(diag))
    rho = torch.where(valid, 1.0 / safe, torch.zeros_like(diag))
    eye = _eye(m, gram)
    upper = eye + rho[:, None] * torch.triu(sy, 1)
    alpha = torch.linalg.solve_triangular(
        upper, (rho * sg)[:, None], upper=True, unitriangular=True
    )[:, 0]
    lower_sy = torch.tril(sy.T, -1)  # [i, j] = y_i . s_j for j < i
    own = alpha if weights is None else weights * alpha  # the pairs' own terms, w_i alpha_i
    rhs = rho * (gamma * (yg - yy @ alpha) + lower_sy @ own)
    lower = eye + rho[:, None] * lower_sy
    beta = torch.linalg.solve_triangular(lower, rhs[:, None], upper=False, unitriangular=True)[:, 0]
    return torch.cat([own - beta, -gamma * alpha])


KERNELS: dict[str, tuple[Kernel, Kernel]] = {
    "bfgs": (bfgs_direct_kernel, bfgs_inverse_kernel),
    "dfp": (dfp_direct_kernel, dfp_inverse_kernel),
    "sr1": (sr1_direct_kernel, sr1_inverse_kernel),
    "broyden": (broyden_direct_kernel, broyden_inverse_kernel),
}
"""``method -> (direct kernel, inverse kernel)``."""


def kernel_apply(
    memory: pm.PairMemory, kernel: torch.Tensor, identity_coef: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``M v = identity_coef v + [S Y] F [S^T v; Y^T v]`` for a flat ``v``."""
    return pm.combine(memory, v, identity_coef, kernel @ pm.project(memory, v))


def kernel_solve(
    memory: pm.PairMemory, kernel: torch.Tensor, identity_coef: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``M^{-1} v`` by one ``2m x 2m`` solve (see the module docstring)."""
    projected = pm.project(memory, v)
    eye = _eye(kernel.shape[0], kernel)
    coef = _solve(identity_coef * eye + kernel @ memory.gram, -(kernel @ projected) / identity_coef)
    return pm.combine(memory, v, 1.0 / identity_coef, coef)


def kernel_operator(
    memory: pm.PairMemory,
    kernel: torch.Tensor | Callable[[], torch.Tensor],
    identity_coef: torch.Tensor,
    params: Any,
) -> Callable[[Any], Any]:
    """``v -> M v`` on pytrees shaped like ``params``; a callable ``kernel`` is built on
    the first product (so publishing costs nothing when no one multiplies)."""
    cache: list[torch.Tensor] = []

    def operator(v: Any) -> Any:
        if not cache:
            cache.append(kernel() if callable(kernel) else kernel)
        flat = tree.ravel(v).flat
        return tree.unravel(kernel_apply(memory, cache[0], identity_coef, flat), params)

    return operator
