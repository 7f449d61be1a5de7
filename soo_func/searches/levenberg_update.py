"""The pieces of one Levenberg(-Marquardt) update, in the order the update runs them.

1. :func:`read_point` -- the extras at ``params`` (value, gradient, ``residual_fn``,
   published ``curvature``), checked.
2. :func:`make_plan` -- the solver (dense QR or matrix-free CG) and the damping rule.
3. :func:`dense_trial` / :func:`matrix_free_trial` -- the damped model's step
   (:mod:`soo_func.searches.damped_gauss_newton`, Moré's step from
   :mod:`soo_func.searches.more_radius`) and the trial point's value and gradient.
4. :func:`next_damping` -- ``lam`` (and Nielsen's ``nu``, Moré's radius) after the gain-ratio
   decision (:mod:`soo_func.searches.damping`, :mod:`soo_func.searches.more_radius`).
5. :func:`search_failed` -- whether no further progress is possible.

The transform itself is :mod:`soo_func.searches.levenberg`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import require_extras
from soo_func.oracles import CountedObjective, charge, value_and_grad
from soo_func.searches.damped_gauss_newton import (
    DampedModel,
    dense_damped_step,
    dense_jacobian,
    krylov_damped_step,
    marquardt_diag,
    model_operator,
    rayleigh_quotient,
)
from soo_func.searches.damping import (
    DampingUpdate,
    multiply_update,
    nielsen_update,
    start_damping,
)
from soo_func.searches.jacobian_cache import JacobianCache, cached_or_fresh, function_token
from soo_func.searches.levenberg_options import LevenbergOptions
from soo_func.searches.more_radius import MoreStep, more_radius_update, more_step

PyTree = Any

__all__ = [
    "Plan",
    "Point",
    "Trial",
    "dense_trial",
    "make_plan",
    "matrix_free_trial",
    "next_damping",
    "read_point",
    "search_failed",
]


class Point(NamedTuple):
    """What an update knows at ``params``: the objective, the optional least-squares
    residuals and published curvature, and the value and gradient there."""

    value_fn: Callable
    residual_fn: Callable | None
    curvature: Callable | None
    value: torch.Tensor
    grad: PyTree


class Plan(NamedTuple):
    """One update's choices: the dense solver or not, and the damping rule in force
    (``"more"``, ``"nielsen"`` or ``"multiply"``)."""

    dense: bool
    rule: str


class Trial(NamedTuple):
    """The damped model, the trial point's value and gradient, Moré's step (with that
    rule) and, for the dense solver, ``(trial, current, token)`` for the Jacobian cache."""

    model: DampedModel
    value: torch.Tensor
    grad: PyTree
    more: MoreStep | None = None
    jacobians: tuple | None = None


def read_point(who: str, marquardt: bool, params: PyTree, extra: dict[str, Any]) -> Point:
    """The extras an update needs, checked; the value and gradient computed when absent."""
    require_extras(who, extra, "value_fn")
    if params is None:
        raise TypeError(f"{who} needs params in update(): pass update(grad, state, params, ...)")
    value_fn, residual_fn = extra["value_fn"], extra.get("residual_fn")
    if marquardt and residual_fn is None:
        raise TypeError(
            f"{who} needs the residual_fn extra (D = diag(J^T J) comes from the Jacobian); "
            "use sf.least_squares(residual_fn, params), or levenberg() for general losses"
        )
    if extra.get("value") is None or extra.get("grad") is None:
        value, grad = value_and_grad(value_fn)(params)
    else:
        value, grad = extra["value"], extra["grad"]
    return Point(value_fn, residual_fn, extra.get("curvature"), value, grad)


def make_plan(who: str, options: LevenbergOptions, point: Point, params: PyTree) -> Plan:
    """The dense solver for least squares without upstream curvature (``"auto"``: up to
    ``dense_max_params`` parameters); Moré's rule with it under ``"auto"``, else Nielsen's."""
    n = sum(leaf.numel() for leaf in tree.leaves(params))
    dense = (
        point.residual_fn is not None
        and point.curvature is None
        and (
            options.solver == "dense"
            or (options.solver == "auto" and n <= options.dense_max_params)
        )
    )
    more = options.damping_rule == "more" or (options.damping_rule == "auto" and dense)
    if more and not dense:
        raise ValueError(
            f"{who}: damping_rule='more' needs the dense least-squares solver (an SVD of "
            "the Jacobian): pass residual_fn, no upstream curvature, and solver='dense' "
            "(or 'auto' with at most dense_max_params parameters); or use 'nielsen'"
        )
    if more:
        return Plan(dense, "more")
    return Plan(dense, "multiply" if options.damping_rule == "multiply" else "nielsen")


def charge_jacobian(point: Point, columns: int, value: int = 0) -> None:
    """Charge a dense Jacobian: ``columns`` products (one ``jvp`` each). To ``residual_fn``
    when it counts itself (``least_squares``; its call already counted the residuals), else
    to ``value_fn`` (``value`` more when the residuals stand in for a value)."""
    if isinstance(point.residual_fn, CountedObjective):
        charge(point.residual_fn, hvp=columns)
    else:
        charge(point.value_fn, hvp=columns, value=value)


def dense_trial(
    options: LevenbergOptions, marquardt: bool, params: PyTree, point: Point, more: bool, *,
    damping: torch.Tensor, damping_diag: PyTree, radius: torch.Tensor, cache: JacobianCache,
) -> Trial:  # fmt: skip
    """The QR (or Moré) step from the Jacobian at ``params`` (cached or evaluated), and the
    trial point's value and gradient from its Jacobian (``n`` products and one residual).

    ``damping`` (negative: not set yet), ``damping_diag`` (Marquardt's running ``D``), ``radius``
    (Moré's) and ``cache`` are what the previous update left."""
    residual_fn = point.residual_fn
    token = function_token(residual_fn)
    jac, r, evaluated = cached_or_fresh(
        cache, params, token, lambda: dense_jacobian(residual_fn, params)
    )
    if evaluated:
        charge_jacobian(point, jac.shape[1], value=1)
    column_sq = (jac * jac).sum(0)
    if marquardt:
        flat_damping_diag = marquardt_diag(tree.ravel(damping_diag).flat, column_sq)
        estimate = torch.full_like(r[0], options.tau)
    else:
        flat_damping_diag = torch.ones_like(column_sq)
        estimate = options.tau * column_sq.max()
    more_model = more_step(radius, params, jac, r, flat_damping_diag) if more else None
    if more_model is None:
        damping = start_damping(damping, estimate, options.initial_damping)
        model = dense_damped_step(jac, r, damping, flat_damping_diag, params)
    else:
        model = more_model.model
    trial = tree.add(params, model.step)
    trial_jac, trial_r = dense_jacobian(residual_fn, trial)
    charge_jacobian(point, trial_jac.shape[1], value=1)
    return Trial(
        model=model,
        value=0.5 * torch.dot(trial_r, trial_r),
        grad=tree.unravel(trial_jac.T @ trial_r, params),
        more=more_model,
        jacobians=((trial_jac, trial_r, trial), (jac, r, params), token),
    )


def matrix_free_trial(
    options: LevenbergOptions, marquardt: bool, params: PyTree, point: Point, *,
    damping: torch.Tensor, damping_diag: PyTree,
) -> Trial:  # fmt: skip
    """The CG step on the damped model, and ``value_and_grad`` at the trial point
    (``damping`` and ``damping_diag`` as in :func:`dense_trial`)."""
    if marquardt:  # diag(J^T J) needs the dense Jacobian: n products
        jac, _ = dense_jacobian(point.residual_fn, params)
        charge_jacobian(point, jac.shape[1])
        column_sq = tree.unravel((jac * jac).sum(0), params)
        damping_diag = tree.map_leaves(marquardt_diag, damping_diag, column_sq)
    operator = model_operator(params, point.value_fn, point.residual_fn, point.curvature)
    if marquardt:  # the damping is relative to D: no product needed for the first one
        estimate = torch.full_like(damping, options.tau)
    else:
        estimate = options.tau * rayleigh_quotient(point.grad, operator)
    damping = start_damping(damping, estimate, options.initial_damping)
    model = krylov_damped_step(point.grad, operator, damping, damping_diag, options.cg_rtol)
    value, grad = value_and_grad(point.value_fn)(tree.add(params, model.step))
    return Trial(model=model, value=value, grad=grad)


def next_damping(
    options: LevenbergOptions, rule: str, trial: Trial, ratio: torch.Tensor,
    accepted: torch.Tensor, value: torch.Tensor, *, nu: torch.Tensor, radius: torch.Tensor,
) -> tuple[DampingUpdate, torch.Tensor]:  # fmt: skip
    """``(lam, nu)`` and Moré's radius after the decision, by the rule in force (``nu``
    and ``radius``: the previous update's; the radius moves with Moré's rule only)."""
    damping = trial.model.damping
    if rule == "more":
        more = trial.more
        new_radius = more_radius_update(
            more.radius, ratio, more.scaled_norm, damping, value, trial.value,
            more.model_decrease,
        )  # fmt: skip
        return DampingUpdate(damping, nu), new_radius
    if rule == "nielsen":
        return nielsen_update(damping, nu, ratio, accepted), radius
    new = multiply_update(
        damping,
        nu,
        accepted,
        increase_factor=options.increase_factor,
        decrease_factor=options.decrease_factor,
    )
    return new, radius


def search_failed(
    options: LevenbergOptions, rule: str, params: PyTree, model: DampedModel,
    accepted: torch.Tensor, damping: torch.Tensor, radius: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """A rejected step with the damping at ``max_damping``, a step below working precision
    (``|p| <= step_rtol (|x| + step_rtol)``) or, with Moré's rule, a radius below it
    (MINPACK's ``xtol`` test on ``|D^(1/2) x|``): no progress is possible."""
    step_norm = tree.norm(model.step)
    stalled = step_norm <= options.step_rtol * (tree.norm(params) + options.step_rtol)
    failed = ~accepted & ((damping >= options.max_damping) | stalled)
    if rule == "more":
        scaled_x = tree.norm(
            tree.map_leaves(lambda s, x: torch.sqrt(s) * x, model.damping_diag, params)
        )
        failed = failed | (~accepted & (radius <= options.step_rtol * scaled_x))
    return failed
