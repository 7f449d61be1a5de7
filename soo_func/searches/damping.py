"""Damping and radius update rules shared by Levenberg(-Marquardt) and trust regions.

All rules are pure tensor functions of 0-d tensors (``torch.where``, no host sync), so
they can be checked number by number on hand-made ratios.

* :func:`nielsen_update` -- Nielsen's damping rule (H. B. Nielsen, "Damping parameter in
  Marquardt's method", IMM-REP-1999-05; Madsen, Nielsen & Tingleff, *Methods for
  Non-Linear Least Squares Problems*, 2004, eq. (3.14)).
* :func:`multiply_update` -- the classic rule (Marquardt 1963): divide the damping by
  ``decrease_factor`` after an accepted step, multiply it by ``increase_factor`` after a
  rejected one.
* :func:`radius_update` -- the trust-region radius rule of Nocedal & Wright,
  *Numerical Optimization* (2nd ed.), Algorithm 4.1.
* :func:`gain_ratio` -- ``rho = actual / predicted`` reduction, with the non-finite and
  non-positive-prediction cases mapped to ``-inf`` (a rejected step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.func as tf

from soo_func import tree

PyTree = Any

DAMPING_RULES = ("nielsen", "multiply", "more", "auto")
SOLVERS = ("auto", "dense", "cg")

__all__ = [
    "DampingUpdate",
    "dense_jacobian",
    "floor_scale",
    "gain_ratio",
    "multiply_update",
    "nielsen_update",
    "radius_update",
    "solve_damped_dense",
    "validate_levenberg_options",
]


class DampingUpdate(NamedTuple):
    """The new damping ``lam`` and Nielsen's growth factor ``nu`` (unused by other rules)."""

    damping: torch.Tensor
    nu: torch.Tensor


def gain_ratio(actual: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """``rho = actual / predicted`` reduction (N&W eq. (4.4); MNT eq. (2.18)).

    ``-inf`` when the prediction is not positive or either reduction is not finite, so
    that every acceptance test rejects the step.
    """
    ok = (predicted > 0) & torch.isfinite(actual) & torch.isfinite(predicted)
    safe = torch.where(ok, predicted, torch.ones_like(predicted))
    return torch.where(ok, actual / safe, torch.full_like(actual, -torch.inf))


def nielsen_update(
    damping: torch.Tensor, nu: torch.Tensor, ratio: torch.Tensor, accepted: torch.Tensor
) -> DampingUpdate:
    """Nielsen's rule (MNT 2004, eq. (3.14) and Algorithm 3.16).

    Accepted step: ``lam <- lam * max(1/3, 1 - (2 rho - 1)^3)`` and ``nu <- 2``.
    Rejected step: ``lam <- lam * nu`` and ``nu <- 2 nu`` (the damping grows ever faster
    while steps keep failing).
    """
    finite_ratio = torch.where(accepted, ratio, torch.zeros_like(ratio))
    shrink = torch.clamp(1 - (2 * finite_ratio - 1) ** 3, min=1.0 / 3.0)
    new_damping = torch.where(accepted, damping * shrink, damping * nu)
    new_nu = torch.where(accepted, torch.full_like(nu, 2.0), 2 * nu)
    return DampingUpdate(new_damping, new_nu)


def multiply_update(
    damping: torch.Tensor,
    nu: torch.Tensor,
    accepted: torch.Tensor,
    *,
    increase_factor: float,
    decrease_factor: float,
) -> DampingUpdate:
    """The classic rule (Marquardt 1963): ``lam / decrease_factor`` if accepted, else
    ``lam * increase_factor``. ``nu`` is passed through unchanged."""
    new_damping = torch.where(accepted, damping / decrease_factor, damping * increase_factor)
    return DampingUpdate(new_damping, nu)


def radius_update(
    radius: torch.Tensor,
    ratio: torch.Tensor,
    step_norm: torch.Tensor,
    *,
    shrink_below: float,
    grow_above: float,
    shrink_factor: float,
    grow_factor: float,
    max_radius: float,
    boundary_rtol: float = 1e-6,
) -> torch.Tensor:
    """The radius rule of Nocedal & Wright, Algorithm 4.1.

    ``rho < shrink_below`` (1/4): ``radius <- shrink_factor * ||p||`` (N&W use 1/4 of the
    radius; shrinking from the step's length, as in Moré's MINPACK, never leaves the
    new radius above a short interior step that failed). ``rho > grow_above`` (3/4) and
    the step on the boundary (``||p|| >= (1 - boundary_rtol) radius``):
    ``radius <- min(grow_factor * radius, max_radius)``. Otherwise unchanged.
    """
    on_boundary = step_norm >= (1 - boundary_rtol) * radius
    shrunk = shrink_factor * torch.minimum(step_norm, radius)
    grown = torch.clamp(grow_factor * radius, max=max_radius)
    new = torch.where(ratio > grow_above, torch.where(on_boundary, grown, radius), radius)
    return torch.where(ratio < shrink_below, shrunk, new)


def _flat_residuals(residual_fn: Callable, like: tree.Raveled) -> Callable:
    def flat_fn(flat: torch.Tensor) -> torch.Tensor:
        out = residual_fn(tree.unravel(flat, like))
        return torch.cat([leaf.reshape(-1) for leaf in tree.leaves(out)])

    return flat_fn


def dense_jacobian(residual_fn: Callable, params: PyTree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, r)``: the m x n Jacobian of the flattened residuals and the residuals, from
    one ``jacfwd`` (``vmap`` over ``n`` ``jvp``s)."""
    raveled = tree.ravel(params)
    flat_fn = _flat_residuals(residual_fn, raveled)

    def with_aux(x):
        r = flat_fn(x)
        return r, r

    jac, r = tf.jacfwd(with_aux, has_aux=True)(raveled.flat)
    return jac, r


def solve_damped_dense(
    jac: torch.Tensor, r: torch.Tensor, damping: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``d`` minimising ``|J d + r|^2 + lam <d, D d>`` by QR of ``[J; sqrt(lam D)]``."""
    n = jac.shape[1]
    augmented = torch.cat([jac, torch.diag(torch.sqrt(damping * scale))])
    rhs = torch.cat([-r, torch.zeros(n, dtype=r.dtype, device=r.device)])
    q, upper = torch.linalg.qr(augmented)
    return torch.linalg.solve_triangular(upper, (q.T @ rhs)[:, None], upper=True)[:, 0]


def floor_scale(scale: torch.Tensor) -> torch.Tensor:
    """``max(scale, eps * max(scale) + tiny)``: a zero column never makes the system singular."""
    eps = torch.finfo(scale.dtype).eps
    tiny = torch.finfo(scale.dtype).tiny
    return torch.clamp(scale, min=eps * scale.max() + tiny)


def validate_levenberg_options(
    who, *, tau, initial_damping, accept_ratio, damping_rule, increase_factor, decrease_factor,
    min_damping, max_damping, solver, dense_max_params, cg_rtol, step_rtol,
):  # fmt: skip
    """Check :func:`~soo_func.searches.levenberg` arguments; errors name ``who``."""
    if tau <= 0:
        raise ValueError(f"{who}: tau must be positive (typical 1e-6 to 1), got {tau}")
    if initial_damping is not None and initial_damping <= 0:
        raise ValueError(f"{who}: initial_damping must be positive or None, got {initial_damping}")
    if not 0 <= accept_ratio < 1:
        raise ValueError(f"{who}: accept_ratio must be in [0, 1), got {accept_ratio}")
    if damping_rule not in DAMPING_RULES:
        raise ValueError(
            f"{who}: damping_rule must be one of {DAMPING_RULES}, got {damping_rule!r}"
        )
    if increase_factor <= 1 or decrease_factor <= 1:
        raise ValueError(
            f"{who}: increase_factor and decrease_factor must exceed 1, got "
            f"{increase_factor} and {decrease_factor}"
        )
    if not 0 < min_damping < max_damping:
        raise ValueError(
            f"{who}: need 0 < min_damping < max_damping, got {min_damping} and {max_damping}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"{who}: solver must be one of {SOLVERS}, got {solver!r}")
    if dense_max_params < 1:
        raise ValueError(f"{who}: dense_max_params must be at least 1, got {dense_max_params}")
    if not 0 < cg_rtol < 1:
        raise ValueError(f"{who}: cg_rtol must be in (0, 1), got {cg_rtol}")
    if step_rtol < 0:
        raise ValueError(f"{who}: step_rtol must be non-negative, got {step_rtol}")
