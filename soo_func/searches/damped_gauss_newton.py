"""The damped Gauss-Newton (or Newton) model of Levenberg-Marquardt and its two solvers.

At ``x`` with gradient ``g``, model curvature ``B`` and damping diagonal ``D``, the
step solves

    (B + lam D) p = -g,

the minimiser of the model ``m(p) = f + <g, p> + 0.5 <p, B p>`` on the ball
``<p, D p> <= Delta^2`` whose multiplier is ``lam`` (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., Theorem 4.1 and section 10.3, eq. (10.32); Levenberg 1944,
Marquardt 1963, Moré 1978). For least squares ``f = 0.5 |r|^2``, ``g = J^T r`` and
``B = J^T J``.

* :func:`dense_damped_step` -- ``min |[J; sqrt(lam D)] p + [r; 0]|`` by a QR factorisation
  of the augmented matrix (N&W eq. (10.34)), never forming ``J^T J``; for ``m < n`` by the
  m x m reduced problem (:func:`solve_damped_wide`); ``J`` from
  :func:`~soo_func.searches.levenberg_jacobian.dense_jacobian` (``vmap`` over ``n``
  ``jvp``s) or in chunks (:mod:`soo_func.searches.levenberg_jacobian`).
* :func:`krylov_damped_step` -- matrix-free CG (:func:`soo_func.krylov.cg`, N&W Algorithm
  5.2) on ``(B + lam D) p = -g`` with ``B`` an operator ``v -> B v``:
  :func:`gauss_newton_operator` (``J^T J v``, one GGN product each), a published
  ``curvature`` or Hessian products (:func:`model_operator`).
* :func:`marquardt_diag` -- ``D = diag(J^T J)`` as the running maximum over the
  iterations (Moré 1978, eq. (6.3)), floored by :func:`floor_damping_diag`.

The predicted reduction ``m(0) - m(p) = -<g, p> - 0.5 <p, B p>`` uses ``|J p|^2`` for the
dense step and ``<p, B p> = -<g, p> - lam <p, D p>`` (the damped system, no extra product)
for the CG step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.krylov import cg
from soo_func.oracles import CountedObjective, charge, ggn_operator, linearize_grad

PyTree = Any
Operator = Callable[[PyTree], PyTree]

__all__ = [
    "DampedModel",
    "dense_damped_step",
    "floor_damping_diag",
    "gauss_newton_operator",
    "krylov_damped_step",
    "least_squares_reduction",
    "marquardt_diag",
    "model_operator",
    "rayleigh_quotient",
    "solve_damped_dense",
    "solve_damped_wide",
]


class DampedModel(NamedTuple):
    """A damped step ``p`` (a pytree like the params), its predicted reduction
    ``m(0) - m(p)``, the damping ``lam`` and damping diagonal ``D`` (a pytree) it was solved
    with, and whether the solve is usable (finite; no negative curvature met by CG)."""

    step: PyTree
    predicted: torch.Tensor
    damping: torch.Tensor
    damping_diag: PyTree
    valid: torch.Tensor


def floor_damping_diag(damping_diag: torch.Tensor) -> torch.Tensor:
    """``max(D, eps * max(D) + tiny)`` for ``D = damping_diag``: a zero column never makes
    the system singular."""
    eps = torch.finfo(damping_diag.dtype).eps
    tiny = torch.finfo(damping_diag.dtype).tiny
    return torch.clamp(damping_diag, min=eps * damping_diag.max() + tiny)


def marquardt_diag(previous: torch.Tensor, column_sq: torch.Tensor) -> torch.Tensor:
    """Marquardt's ``D``: the running maximum of ``diag(J^T J)`` (the squared column norms
    ``column_sq``), floored (Moré 1978, eq. (6.3))."""
    return floor_damping_diag(torch.maximum(previous, column_sq))


def solve_damped_dense(
    jac: torch.Tensor, r: torch.Tensor, damping: torch.Tensor, damping_diag: torch.Tensor
) -> torch.Tensor:
    """``p`` minimising ``|J p + r|^2 + lam <p, D p>`` by QR of ``[J; sqrt(lam D)]``
    (N&W eq. (10.34)); by :func:`solve_damped_wide` when ``J`` (m x n) has ``m < n``."""
    m, n = jac.shape
    if m < n:
        return solve_damped_wide(jac, r, damping, damping_diag)
    augmented = torch.cat([jac, torch.diag(torch.sqrt(damping * damping_diag))])
    rhs = torch.cat([-r, torch.zeros(n, dtype=r.dtype, device=r.device)])
    q, upper = torch.linalg.qr(augmented)
    return torch.linalg.solve_triangular(upper, (q.T @ rhs)[:, None], upper=True)[:, 0]


def solve_damped_wide(
    jac: torch.Tensor, r: torch.Tensor, damping: torch.Tensor, damping_diag: torch.Tensor
) -> torch.Tensor:
    """:func:`solve_damped_dense` for ``m < n`` without an n x n (or (m + n) x n) factor.

    With ``q = D^(1/2) p`` and ``A = J D^(-1/2) = R^T Q^T`` (the QR of the n x m ``A^T``:
    ``Q`` n x m orthonormal, ``R`` m x m), write ``q = Q y + z`` with ``Q^T z = 0``. Then
    ``A q = R^T y`` and ``|q|^2 = |y|^2 + |z|^2``, so the minimiser has ``z = 0`` and ``y``
    solves the m x m damped problem ``min |R^T y + r|^2 + lam |y|^2`` (the QR of
    ``[R^T; sqrt(lam) I]``, N&W eq. (10.34) again); ``p = D^(-1/2) Q y``. This is the
    solution ``p = -D^-1 J^T (J D^-1 J^T + lam I)^(-1) r`` of the m x m form (the
    push-through identity), without forming ``J D^-1 J^T`` and squaring its condition
    number (Moré 1978 §3 reduces ``J`` to a triangle the same way, from the other side).
    Memory: a scaled copy of ``J`` and ``Q``, both m x n, and m x m factors."""
    scale = torch.rsqrt(damping_diag)
    q, upper = torch.linalg.qr((jac * scale).T)
    y = solve_damped_dense(upper.T, r, damping, torch.ones_like(r))
    return scale * (q @ y)


def least_squares_reduction(jac: torch.Tensor, r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``m(0) - m(p) = -<r, J p> - 0.5 |J p|^2`` for ``f = 0.5 |r|^2`` (flat ``p``)."""
    jp = jac @ p
    return -torch.dot(r, jp) - 0.5 * torch.dot(jp, jp)


def dense_damped_step(
    jac: torch.Tensor,
    r: torch.Tensor,
    damping: torch.Tensor,
    damping_diag: torch.Tensor,
    like: PyTree,
) -> DampedModel:
    """The damped Gauss-Newton step by QR (flat ``damping_diag``), as a pytree like ``like``."""
    p = solve_damped_dense(jac, r, damping, damping_diag)
    return DampedModel(
        step=tree.unravel(p, like),
        predicted=least_squares_reduction(jac, r, p),
        damping=damping,
        damping_diag=tree.unravel(damping_diag, like),
        valid=torch.isfinite(p).all(),
    )


def rayleigh_quotient(grad: PyTree, operator: Operator) -> torch.Tensor:
    """``|<g, B g>| / |g|^2`` (one product), floored at the smallest normal number: the
    magnitude of ``B`` along ``g``, for the first damping of matrix-free Levenberg."""
    grad_curv = tree.vdot(grad, operator(grad))
    ratio = grad_curv.abs() / torch.clamp(tree.sum_of_squares(grad), min=1e-300)
    return torch.clamp(ratio, min=torch.finfo(ratio.dtype).tiny)


def krylov_damped_step(
    grad: PyTree, operator: Operator, damping: torch.Tensor, damping_diag: PyTree, rtol: float
) -> DampedModel:
    """CG on ``(B + lam D) p = -g`` to relative residual ``rtol``.

    ``<p, B p> = -<g, p> - lam <p, D p>`` up to CG's residual (the error is at most
    ``|p| rtol |g|``), so the predicted reduction costs no product.
    """

    def damped(v: PyTree) -> PyTree:
        return tree.add(operator(v), tree.map_leaves(lambda s, x: damping * s * x, damping_diag, v))

    result = cg(damped, tree.neg(grad), rtol=rtol)
    p = result.x
    g_p = tree.vdot(grad, p)
    p_scaled_p = tree.vdot(tree.map_leaves(lambda s, x: s * x, damping_diag, p), p)
    curvature = -g_p - damping * p_scaled_p
    return DampedModel(
        step=p,
        predicted=-g_p - 0.5 * curvature,
        damping=damping,
        damping_diag=damping_diag,
        valid=~torch.as_tensor(result.negative_curvature, device=damping.device),
    )


def gauss_newton_operator(residual_fn: Callable, params: PyTree, value_fn: Callable) -> Operator:
    """``v -> J^T J v`` at ``params`` (:func:`soo_func.oracles.ggn_operator`), each product
    charged as one Hessian product: to ``residual_fn`` when it counts itself, else to
    ``value_fn`` (the driver's counter)."""
    _, matvec = ggn_operator(residual_fn, params)
    if isinstance(residual_fn, CountedObjective):
        return matvec

    def product(v: PyTree) -> PyTree:
        charge(value_fn, hvp=1)
        return matvec(v)

    return product


def model_operator(
    params: PyTree, value_fn: Callable, residual_fn: Callable | None, curvature: Operator | None
) -> Operator:
    """The model curvature ``B``: a published ``curvature``, else ``J^T J`` from
    ``residual_fn``, else the Hessian of ``value_fn`` (one product each)."""
    if curvature is not None:
        return curvature
    if residual_fn is not None:
        return gauss_newton_operator(residual_fn, params, value_fn)
    return linearize_grad(value_fn, params)[2]
