"""The pieces of one Levenberg(-Marquardt) update, in the order the update runs them.

1. :func:`read_point` -- the extras at ``params`` (value, gradient, ``residual_fn``,
   published ``curvature``), checked.
2. :func:`make_plan` -- the solver (the Jacobian, in one ``vmap`` or in chunks, or
   matrix-free CG: :func:`solver_choice`, then the memory budget on the m x n Jacobian),
   the damping rule, and for the dense modes the Jacobian at ``params`` (cached or evaluated,
   :mod:`soo_func.searches.levenberg_jacobian`).
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
from soo_func.oracles import CountedObjective, charge, raw_function, value_and_grad
from soo_func.searches.damped_gauss_newton import (
    DampedModel,
    dense_damped_step,
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
from soo_func.searches.jacobian_cache import (
    JacobianCache,
    filled,
    function_token,
    lookup,
    select_cached,
)
from soo_func.searches.levenberg_jacobian import (
    chunk_count,
    column_sq,
    default_max_jacobian_bytes,
    jacobian,
)
from soo_func.searches.levenberg_options import LevenbergOptions
from soo_func.searches.more_radius import MoreStep, more_radius_update, more_step

PyTree = Any

__all__ = [
    "Current",
    "Plan",
    "Point",
    "Trial",
    "charge_jacobian",
    "current_jacobian",
    "dense_trial",
    "jacobian_budget",
    "make_plan",
    "matrix_free_trial",
    "next_damping",
    "read_point",
    "search_failed",
    "solver_choice",
]


class Point(NamedTuple):
    """What an update knows at ``params``: the objective, the optional least-squares
    residuals and published curvature, the value and gradient there, and whether the
    caller promised that ``params`` continues the previous update (the ``continues``
    extra)."""

    value_fn: Callable
    residual_fn: Callable | None
    curvature: Callable | None
    value: torch.Tensor
    grad: PyTree
    continues: bool = False


class Current(NamedTuple):
    """The Jacobian ``jac`` and residuals ``r`` at ``params`` of the residual function with
    token ``token``, and whether they were evaluated in this update (else cached)."""

    jac: torch.Tensor
    residuals: torch.Tensor
    token: int
    evaluated: bool


class Plan(NamedTuple):
    """One update's choices: the mode (one of
    :data:`~soo_func.searches.levenberg_options.MODES`), the damping rule in force
    (``"more"``, ``"nielsen"`` or ``"multiply"``) and, in the dense modes, the Jacobian at
    ``params``."""

    mode: str
    rule: str
    current: Current | None

    @property
    def dense(self) -> bool:
        return self.current is not None


class Trial(NamedTuple):
    """The damped model, the trial point's value and gradient, Moré's step (with that
    rule) and, for the dense solver, ``(trial, current, token)`` for the Jacobian cache."""

    model: DampedModel
    value: torch.Tensor
    grad: PyTree
    more: MoreStep | None = None
    jacobians: tuple | None = None


def read_point(who: str, marquardt: bool, params: PyTree, extra: dict[str, Any]) -> Point:
    """The extras an update needs, checked; the value and gradient computed when absent.
    ``continues`` is the caller's promise (the ``continues`` extra) that ``params`` and the
    state are those the previous update published, with the same functions."""
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
    continues = extra.get("continues") is True
    return Point(value_fn, residual_fn, extra.get("curvature"), value, grad, continues)


def solver_choice(options: LevenbergOptions, point: Point, n: int) -> str:
    """``"cg"`` (matrix-free), ``"dense"`` or ``"fit"`` (dense when the Jacobian fits
    ``max_jacobian_bytes``), from what the update knows before any evaluation: the
    Jacobian needs ``residual_fn`` and no upstream curvature; ``solver="auto"`` takes
    ``"fit"`` up to ``dense_max_params`` parameters (no limit when it is ``None``)."""
    if point.residual_fn is None or point.curvature is not None:
        return "cg"
    if options.solver != "auto":
        return options.solver
    limit = options.dense_max_params
    return "cg" if limit is not None and n > limit else "fit"


def jacobian_budget(options: LevenbergOptions, params: PyTree) -> int:
    """``options.max_jacobian_bytes``, else the default budget of the params' device."""
    if options.max_jacobian_bytes is not None:
        return options.max_jacobian_bytes
    return default_max_jacobian_bytes(tree.leaves(params)[0].device)


def current_jacobian(
    options: LevenbergOptions, fit: bool, point: Point, params: PyTree, cache: JacobianCache
) -> Current | None:
    """The Jacobian at ``params``: the cached one when it is of this residual function at
    this point, else evaluated (``n`` or ``m`` products and one residual evaluation), or
    ``None`` when ``fit`` and the m x n Jacobian exceeds the budget (sized without an
    evaluation when ``m`` is known, else from the first chunk, charged).

    Whether the cache belongs here is known three ways: ``point.continues`` (the caller
    promises that ``params`` is the point the previous update stored the cache at, for the
    same function: the sync-free driver from its second step) takes a filled cache as it
    is; else the host compares the point and the function's token where it may read; else
    (traced or vmapped, no promise) the Jacobian is evaluated and the cached one selected
    by ``torch.where`` (:func:`~soo_func.searches.jacobian_cache.select_cached`)."""
    token = function_token(point.residual_fn)
    if point.continues and filled(cache, params):
        return Current(cache.jacobian, cache.residuals, token, False)
    if tree.host_reads_allowed():
        cached = lookup(cache, params, token)
        if cached is not None:
            return Current(*cached, token, False)
    budget = jacobian_budget(options, params) if fit else None
    fresh = jacobian(raw_function(point.residual_fn), params, options.chunk_size, budget)
    if fresh.residuals is not None:
        charge_jacobian(point, fresh.products, value=1)
    if fresh.jac is None:
        return None
    jac, r = fresh.jac, fresh.residuals
    if not tree.host_reads_allowed():
        jac, r = select_cached(cache, params, token, jac, r)
    return Current(jac, r, token, True)


def make_plan(
    who: str, options: LevenbergOptions, point: Point, params: PyTree, cache: JacobianCache
) -> Plan:
    """The mode (:func:`solver_choice`, then the budget), with the Jacobian at ``params`` in
    the dense modes; Moré's rule with the dense solver under ``"auto"``, else Nielsen's."""
    n = sum(leaf.numel() for leaf in tree.leaves(params))
    choice = solver_choice(options, point, n)
    current = None
    if choice != "cg":
        current = current_jacobian(options, choice == "fit", point, params, cache)
    dense = current is not None
    mode = "matrix_free"
    if dense:
        chunks = chunk_count(current.jac.shape[0], n, options.chunk_size)
        mode = "dense" if chunks == 1 else "dense_chunked"
    more = options.damping_rule == "more" or (options.damping_rule == "auto" and dense)
    if more and not dense:
        raise ValueError(
            f"{who}: damping_rule='more' needs the dense least-squares solver (an SVD of "
            "the Jacobian): pass residual_fn, no upstream curvature, and solver='dense' "
            "(or 'auto' with at most dense_max_params parameters and a Jacobian within "
            "max_jacobian_bytes); or use 'nielsen'"
        )
    if more:
        return Plan(mode, "more", current)
    return Plan(mode, "multiply" if options.damping_rule == "multiply" else "nielsen", current)


def charge_jacobian(point: Point, products: int, value: int = 0) -> None:
    """Charge a dense Jacobian: ``products`` products (a ``jvp`` per column or a ``vjp``
    per row) and its one residual evaluation: to ``residual_fn`` when it counts itself
    (``least_squares``), else to ``value_fn`` (``value`` there: 1 when the residuals stand
    in for a value)."""
    if isinstance(point.residual_fn, CountedObjective):
        charge(point.residual_fn, hvp=products, value=1)
    else:
        charge(point.value_fn, hvp=products, value=value)


def dense_trial(
    options: LevenbergOptions, marquardt: bool, params: PyTree, point: Point, more: bool, *,
    current: Current, damping: torch.Tensor, damping_diag: PyTree, radius: torch.Tensor,
) -> Trial:  # fmt: skip
    """The QR (or Moré) step from the Jacobian at ``params`` (``current``), and the trial
    point's value and gradient from its Jacobian (``n`` or ``m`` products and one residual).

    ``damping`` (negative: not set yet), ``damping_diag`` (Marquardt's running ``D``) and
    ``radius`` (Moré's) are what the previous update left."""
    jac, r = current.jac, current.residuals
    column_sq = (jac * jac).sum(0)
    if marquardt:
        flat_damping_diag = marquardt_diag(tree.ravel(damping_diag).flat, column_sq)
        estimate = torch.full_like(r[0], options.tau)
    else:
        flat_damping_diag = torch.ones_like(column_sq)
        estimate = options.tau * column_sq.max()
    del column_sq
    more_model = more_step(radius, params, jac, r, flat_damping_diag) if more else None
    if more_model is None:
        damping = start_damping(damping, estimate, options.initial_damping)
        model = dense_damped_step(jac, r, damping, flat_damping_diag, params)
    else:
        model = more_model.model
    trial = tree.add(params, model.step)
    fresh = jacobian(raw_function(point.residual_fn), trial, options.chunk_size)
    charge_jacobian(point, fresh.products, value=1)
    trial_jac, trial_r = fresh.jac, fresh.residuals
    return Trial(
        model=model,
        value=0.5 * torch.dot(trial_r, trial_r),
        grad=tree.unravel(trial_jac.T @ trial_r, params),
        more=more_model,
        jacobians=((trial_jac, trial_r, trial), (jac, r, params), current.token),
    )


def matrix_free_trial(
    options: LevenbergOptions, marquardt: bool, params: PyTree, point: Point, *,
    damping: torch.Tensor, damping_diag: PyTree,
) -> Trial:  # fmt: skip
    """The CG step on the damped model, and ``value_and_grad`` at the trial point
    (``damping`` and ``damping_diag`` as in :func:`dense_trial`). Marquardt's
    ``diag(J^T J)`` is accumulated a chunk of the Jacobian at a time, never storing it
    (``n`` or ``m`` products)."""
    if marquardt:
        raw = raw_function(point.residual_fn)
        flat_sq, products = column_sq(raw, params, options.chunk_size)
        charge_jacobian(point, products)
        damping_diag = tree.map_leaves(marquardt_diag, damping_diag, tree.unravel(flat_sq, params))
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
