"""L-BFGS: the limited-memory BFGS direction by the two-loop recursion.

Nocedal & Wright (2006), Algorithm 7.4 (two-loop recursion) with the initial matrix
``H0 = gamma I``, ``gamma = s^T y / y^T y`` of the newest pair (eq. 7.20).

The recursion is evaluated in its *vector-free* arrangement (Chen, Wang & Zhou,
"Large-scale L-BFGS using MapReduce", NeurIPS 2014): every inner product it takes is
a combination of ``S^T g``, ``Y^T g`` and the Gram matrix of the pairs, which
:mod:`~soo_func.directions.pair_memory` keeps up to date from one pass over the
memory. With ``rho_i = 1 / s_i^T y_i`` the first loop
``alpha_i = rho_i s_i^T (g - sum_{j>i} alpha_j y_j)`` is the unit upper-triangular
system ``(I + diag(rho) triu(S^T Y, 1)) alpha = rho * S^T g``; the second loop
``beta_i = rho_i y_i^T r_i``, ``r_i = gamma q + sum_{j<i} (alpha_j - beta_j) s_j``,
``q = g - Y alpha``, is the unit lower-triangular system
``(I + diag(rho) L) beta = rho * (gamma (Y^T g - Y^T Y alpha) + L alpha)``,
``L = tril(Y^T S, -1)``. Forward substitution in these systems performs the same
arithmetic as the loops; the long vectors are touched once more, for
``H g = gamma g - gamma Y alpha + S (alpha - beta)``.

Cost per update with ``m`` pairs of ``n`` parameters: ``2m`` inner products with ``g``
(one ``[2, n] x [n]`` product per stored pair), ``2m`` multiply-adds for the result, and
a few ``m x m`` operations; no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform
from soo_func.directions import pair_memory as pm
from soo_func.directions.compact import bfgs_direct_kernel, kernel_operator

__all__ = ["LbfgsState", "lbfgs", "two_loop_coefficients"]


class LbfgsState(NamedTuple):
    """State of :func:`lbfgs`: the pair memory, the ``H0`` scale used at the last update
    and a step-length hint for the search (``1 / |g|`` while the memory is empty).

    The memory's Gram matrix holds what the two-loop recursion reads (``triu(S^T Y)``,
    ``Y^T Y``); the inner products of older pairs with each new ``s`` are not computed
    (zeros; see :func:`~soo_func.directions.pair_memory.push`)."""

    memory: pm.PairMemory
    gamma: torch.Tensor
    initial_step: torch.Tensor


def _newest_valid(values: torch.Tensor, valid: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """``values[i]`` at the newest valid slot ``i``, or ``default`` when none is valid."""
    m = valid.shape[0]
    order = torch.arange(1, m + 1, device=valid.device) * valid
    newest = torch.argmax(order)
    return torch.where(valid.any(), values[newest], default)


def _first_step_hint(
    grad: torch.Tensor, gg: torch.Tensor, empty: torch.Tensor, order: float
) -> torch.Tensor:
    """``min(1, 1 / |g|_order)`` while the memory is ``empty`` (and ``g != 0``), else 1."""
    if order == 2:
        inverse = torch.rsqrt(gg)
    else:
        inverse = 1.0 / torch.linalg.vector_norm(grad, ord=order).to(gg.dtype)
    first = torch.clamp(inverse, max=1.0)
    return torch.where(empty & (gg > 0), first, torch.ones_like(first))


def lbfgs_gamma(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``gamma = s^T y / y^T y`` of the newest valid pair (N&W eq. 7.20), else 1."""
    m = valid.shape[0]
    sy = torch.diagonal(gram[:m, m:])
    yy = torch.diagonal(gram[m:, m:])
    ratio = sy / torch.where(valid, yy, torch.ones_like(yy))
    return _newest_valid(ratio, valid, torch.ones((), dtype=gram.dtype, device=gram.device))


def two_loop_coefficients(
    gram: torch.Tensor,
    valid: torch.Tensor,
    sg: torch.Tensor,
    yg: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Coefficients ``[c_s; c_y]`` with ``H g = gamma g + S c_s + Y c_y`` (N&W Alg. 7.4).

    ``gram`` is the Gram matrix of ``[S, Y]`` (``2m x 2m``), ``sg = S^T g``,
    ``yg = Y^T g``; invalid slots get ``rho = 0`` and drop out of both loops.
    """
    m = valid.shape[0]
    sy = gram[:m, m:]
    yy = gram[m:, m:]
    diag = torch.diagonal(sy)
    safe = torch.where(valid, diag, torch.ones_like(diag))
    rho = torch.where(valid, 1.0 / safe, torch.zeros_like(diag))
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    upper = eye + rho[:, None] * torch.triu(sy, 1)
    alpha = torch.linalg.solve_triangular(
        upper, (rho * sg)[:, None], upper=True, unitriangular=True
    )[:, 0]
    lower_sy = torch.tril(sy.T, -1)  # [i, j] = y_i . s_j for j < i
    rhs = rho * (gamma * (yg - yy @ alpha) + lower_sy @ alpha)
    lower = eye + rho[:, None] * lower_sy
    beta = torch.linalg.solve_triangular(lower, rhs[:, None], upper=False, unitriangular=True)[:, 0]
    return torch.cat([alpha - beta, -gamma * alpha])


def lbfgs(
    memory_size: int = 10,
    *,
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
    first_step_norm: float = 1,
) -> Transform:
    """The L-BFGS direction ``d = -H g`` (N&W Alg. 7.4, with ``H0 = gamma I``, eq. 7.20).

    Args:
      memory_size: how many curvature pairs ``(s, y)`` to keep.
      curvature_eps: a pair is skipped when ``s^T y <= curvature_eps * |s| |y|`` (default:
        the machine epsilon of the params' dtype). A skipped pair still occupies its slot
        (marked invalid) until it leaves the memory.
      initial_scaling: a fixed ``H0 = initial_scaling * I`` instead of eq. 7.20's ``gamma``.
      first_step_norm: ``p`` of the step-length hint ``min(1, 1 / |g|_p)`` that the search
        starts from while the memory is empty (the direction is then ``-g``): ``1``
        (default, as ``torch.optim.LBFGS``) makes the first step ``|g|_2 / |g|_1`` long,
        between ``n^(-1/2)`` and 1, so it shortens with the dimension; ``2`` is a step of
        unit length (scipy's L-BFGS-B); ``inf`` the longest, ``|g|_2 / |g|_inf``.

    The incoming ``updates`` are the gradient at ``params``; ``params`` is required. The
    pair ``s = x_k - x_{k-1}``, ``y = g_k - g_{k-1}`` is formed from the params and
    gradient of consecutive calls. When ``-H g`` is not a descent direction the memory is
    cleared and the direction is ``-g``. No host synchronisation: all decisions are masks.

    Publishes ``curvature``: ``v -> B v`` with ``B = H^{-1}`` by the compact BFGS
    formula (Byrd, Nocedal & Schnabel 1994, eq. 2.17), and ``initial_step``.
    """
    pm.check_memory_size("lbfgs", memory_size)
    if curvature_eps is not None and not curvature_eps >= 0:
        raise ValueError(f"lbfgs: curvature_eps must be >= 0, got {curvature_eps}")
    if initial_scaling is not None and not initial_scaling > 0:
        raise ValueError(f"lbfgs: initial_scaling must be positive, got {initial_scaling}")
    if first_step_norm not in (1, 2, math.inf):
        raise ValueError(
            f"lbfgs: first_step_norm must be 1, 2 or math.inf, got {first_step_norm!r}"
        )

    def init(params: Any) -> LbfgsState:
        leaves = tree.leaves(params)
        n = sum(leaf.numel() for leaf in leaves)
        dtype, device = leaves[0].dtype, leaves[0].device
        one = torch.ones((), dtype=pm.compute_dtype(dtype), device=device)
        return LbfgsState(pm.init_memory(memory_size, n, dtype, device), one, one)

    def accept_rule(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(gram.dtype).eps if curvature_eps is None else curvature_eps
        sy, ss, yy = gram[memory_size - 1, -1], gram[memory_size - 1, memory_size - 1], gram[-1, -1]
        return sy > eps * torch.sqrt(ss * yy)

    def update(updates, state: LbfgsState, params=None, **extra):
        del extra
        if params is None:
            raise TypeError("lbfgs needs params in update(updates, state, params) to form s")
        point = pm.flat_point(params, updates)
        memory, sg, yg, gg = pm.push(state.memory, point, accept_rule, full_gram=False)
        if initial_scaling is None:
            gamma = lbfgs_gamma(memory.gram, memory.valid)
        else:
            gamma = torch.full_like(state.gamma, initial_scaling)
        coef = two_loop_coefficients(memory.gram, memory.valid, sg, yg, gamma)
        m = memory_size
        slope = -(gamma * gg + sg @ coef[:m] + yg @ coef[m:])  # g^T d with d = -H g
        descent = (slope < 0) & torch.isfinite(slope)
        coef = torch.where(descent, coef, torch.zeros_like(coef))
        scale = torch.where(descent, gamma, torch.ones_like(gamma))
        memory = memory._replace(valid=memory.valid & descent)
        direction = pm.combine(memory, point[1], -scale, -coef)
        empty = ~memory.valid.any()
        initial_step = _first_step_hint(point[1], gg, empty, first_step_norm)
        new_state = LbfgsState(memory, scale, initial_step)
        return tree.unravel(direction, params), new_state

    def publish(state: LbfgsState, params=None, **extra) -> dict[str, Any]:
        del extra
        sigma = 1.0 / state.gamma
        memory = state.memory

        def kernel() -> torch.Tensor:
            # The update skips S^T s (see push(full_gram=False)): complete the Gram
            # matrix here, once per published operator, only when someone multiplies.
            nonlocal memory
            memory = memory._replace(gram=pm.complete_gram(memory))
            return bfgs_direct_kernel(memory.gram, memory.valid, sigma)

        operator = kernel_operator(memory, kernel, sigma, params)
        return {"curvature": operator, "step_hint": state.initial_step}

    return Transform(init, update, publish)
