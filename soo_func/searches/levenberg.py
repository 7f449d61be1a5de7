"""Levenberg and Levenberg-Marquardt: damped Gauss-Newton (or Newton) steps.

Each update solves the damped model system

    (B + lam D) d = -g,

with ``g`` the gradient, ``B`` the model curvature and ``D`` the damping scale, evaluates
the trial point ``x + d`` once and accepts it when the gain ratio
``rho = (f(x) - f(x + d)) / (m(0) - m(d))`` exceeds ``accept_ratio``; the damping ``lam``
then follows Nielsen's rule or the classic multiply/divide rule (see
:mod:`soo_func.searches.damping`), or comes from Moré's trust radius on ``|D^(1/2) d|``
(``damping_rule="more"``, MINPACK's ``lmder``: :mod:`soo_func.searches.more_radius`).
``levenberg_marquardt`` uses Moré's rule with the dense solver and Nielsen's otherwise
(``"auto"``; the measurements behind that choice are in that module). References: Levenberg (1944), Marquardt (1963), Moré
(1978) "The Levenberg-Marquardt algorithm: implementation and theory", Madsen, Nielsen &
Tingleff (2004) *Methods for Non-Linear Least Squares Problems*, §3.2 (Algorithm 3.16).

The model ``B`` is, in order of preference:

1. ``curvature`` published by an upstream direction (``chain(newton_krylov(),
   levenberg())`` damps the Newton model, ``chain(gauss_newton(), levenberg())`` the
   Gauss-Newton one);
2. ``J^T J`` from the ``residual_fn`` extra (least squares, loss ``0.5 |r|^2``);
3. the Hessian of ``value_fn`` (Hessian-vector products), for general losses.

``D = I`` for :func:`levenberg`; ``D = diag(J^T J)`` for :func:`levenberg_marquardt`,
kept as the running maximum over the iterations (Moré 1978, eq. (6.3)) and floored at
``eps * max(D)`` so that a zero column never makes the system singular.

Solvers. ``"dense"``: the Jacobian ``J`` (m x n) is formed with ``vmap`` over ``n``
``jvp``s (``torch.func.jacfwd``) and ``min |[J; sqrt(lam D)] d + [r; 0]|`` is solved by a
QR factorisation of the augmented matrix (never forming ``J^T J``). ``"cg"``: matrix-free
CG (:func:`soo_func.krylov.cg`) on the damped normal equations, each product ``J^T (J v)``
one ``jvp`` and one ``vjp``. Marquardt's ``diag(J^T J)`` has no cheap matrix-free route
(each entry is a squared column norm of ``J``), so with ``"cg"`` it is still computed
exactly from the dense Jacobian (``n`` products per step): for large ``n`` use
:func:`levenberg` (``D = I``). ``"auto"`` (default) picks ``"dense"`` for least squares
with at most ``dense_max_params`` parameters and ``"cg"`` otherwise (the measurements
behind that choice: ``docs/design.md``, section 9). The ``"cg"`` step's predicted
reduction uses ``d^T B d = -g^T d - lam d^T D d`` (no extra product).

Counting: a Jacobian product (a dense column, a ``jvp``, a ``vjp``) is one Hessian product
to the driver's ``CountedObjective``, a residual evaluation one value. The dense solver
evaluates the Jacobian at each trial point (``n`` products and one residual evaluation,
which give the trial's ``0.5 |r|^2`` and ``J^T r``) and keeps it for the next update: a
step costs ``n + 1``, accepted or not (MINPACK: 1 per trial, ``n`` per accepted step).
The matrix-free modes evaluate the trial with ``value_and_grad``. Host syncs: dense mode
one per update (is the cached Jacobian at ``params``?); acceptance is a ``torch.where``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.func as tf

from soo_func import tree
from soo_func.base import Transform, require_extras
from soo_func.oracles import charge, linearize_grad, value_and_grad
from soo_func.searches.damping import (
    DampingUpdate,
    dense_jacobian,
    floor_scale,
    gain_ratio,
    multiply_update,
    nielsen_update,
    solve_damped_dense,
    validate_levenberg_options,
)
from soo_func.searches.more_radius import DampedModel, more_model, more_radius_update

PyTree = Any

__all__ = ["LevenbergState", "levenberg", "levenberg_marquardt"]


class LevenbergState(NamedTuple):
    """State of :func:`levenberg` / :func:`levenberg_marquardt` (all 0-d unless noted).

    ``damping`` is negative before the first update (then it is set from ``tau``);
    ``nu`` is Nielsen's growth factor; ``scale`` is Marquardt's running ``diag(J^T J)``
    (a pytree like the params; ones for Levenberg); ``next_value``/``next_grad`` are the
    objective and gradient at ``params + updates`` (at ``params`` after a rejection).
    The dense solver caches the Jacobian ``jacobian`` (m x n), ``residuals`` (m) and the
    flat point ``jacobian_at`` (n) where they were computed (empty before the first).
    """

    damping: torch.Tensor
    nu: torch.Tensor
    ratio: torch.Tensor
    step_accepted: torch.Tensor
    search_failed: torch.Tensor
    next_value: torch.Tensor
    next_grad: PyTree
    scale: PyTree
    jacobian: torch.Tensor
    residuals: torch.Tensor
    jacobian_at: torch.Tensor
    radius: torch.Tensor


def _make(who: str, marquardt: bool, **options: Any) -> Transform:
    validate_levenberg_options(who, **options)
    tau = options["tau"]
    initial_damping = options["initial_damping"]
    solver = options["solver"]
    rule = options["damping_rule"]

    def init(params: PyTree) -> LevenbergState:
        like = tree.leaves(params)[0]
        scalar = {"dtype": like.dtype, "device": like.device}
        return LevenbergState(
            damping=torch.full((), -1.0, **scalar),
            nu=torch.full((), 2.0, **scalar),
            ratio=torch.zeros((), **scalar),
            step_accepted=torch.zeros((), dtype=torch.bool, device=like.device),
            search_failed=torch.zeros((), dtype=torch.bool, device=like.device),
            next_value=torch.zeros((), **scalar),
            next_grad=tree.zeros_like(params),
            scale=tree.zeros_like(params) if marquardt else tree.ones_like(params),
            jacobian=torch.zeros((0, 0), **scalar),
            residuals=torch.zeros((0,), **scalar),
            jacobian_at=torch.zeros((0,), **scalar),
            radius=torch.full((), -1.0, **scalar),
        )

    def first_damping(state: LevenbergState, estimate: torch.Tensor) -> torch.Tensor:
        start = estimate if initial_damping is None else torch.full_like(estimate, initial_damping)
        return torch.where(state.damping < 0, start, state.damping)

    def cached_jacobian(state, params, residual_fn, value_fn):
        flat = tree.ravel(params).flat
        at = state.jacobian_at
        if at.shape == flat.shape and torch.equal(at, flat):  # one host sync
            return state.jacobian, state.residuals
        jac, r = dense_jacobian(residual_fn, params)
        charge(value_fn, hvp=jac.shape[1], value=1)
        return jac, r

    def dense_model(state, params, residual_fn, value_fn, more: bool) -> DampedModel:
        jac, r = cached_jacobian(state, params, residual_fn, value_fn)
        column_sq = (jac * jac).sum(0)
        if marquardt:
            scale = floor_scale(torch.maximum(tree.ravel(state.scale).flat, column_sq))
            estimate = torch.full_like(r[0], tau)
        else:
            scale = torch.ones_like(column_sq)
            estimate = tau * column_sq.max()
        if more:
            return more_model(state.radius, params, jac, r, scale)
        damping = first_damping(state, estimate)
        d = solve_damped_dense(jac, r, damping, scale)
        jd = jac @ d
        predicted = -torch.dot(r, jd) - 0.5 * torch.dot(jd, jd)
        valid = torch.isfinite(d).all()
        return DampedModel(
            tree.unravel(d, params), predicted, damping, tree.unravel(scale, params), valid, jac, r
        )

    def krylov_model(state, params, grad, operator, value_fn, scale) -> DampedModel:
        from soo_func.krylov import cg

        if marquardt:  # the damping is relative to D: no product needed for the first one
            estimate = torch.full_like(state.damping, tau)
        else:
            grad_curv = tree.vdot(grad, operator(grad))
            ratio = grad_curv.abs() / torch.clamp(tree.sum_of_squares(grad), min=1e-300)
            estimate = tau * torch.clamp(ratio, min=torch.finfo(ratio.dtype).tiny)
        damping = first_damping(state, estimate)

        def damped(v):
            return tree.add(operator(v), tree.map(lambda s, x: damping * s * x, scale, v))

        result = cg(damped, tree.neg(grad), rtol=options["cg_rtol"])
        d = result.x
        # (B + lam D) d = -g up to CG's residual: d^T B d = -g^T d - lam d^T D d (no product;
        # the error is at most |d| * cg_rtol * |g|).
        g_d = tree.vdot(grad, d)
        d_scaled_d = tree.vdot(tree.map(lambda s, x: s * x, scale, d), d)
        curvature = -g_d - damping * d_scaled_d
        predicted = -g_d - 0.5 * curvature
        valid = ~torch.as_tensor(result.negative_curvature, device=damping.device)
        return DampedModel(d, predicted, damping, scale, valid)

    def least_squares_operator(params, residual_fn, value_fn):
        _, vjp_fn = tf.vjp(residual_fn, params)

        def ggn(v):
            charge(value_fn, hvp=2)
            jv = tf.jvp(residual_fn, (params,), (v,))[1]
            return vjp_fn(jv)[0]

        return ggn

    def update(updates, state: LevenbergState, params=None, **extra):
        del updates  # the step is computed here from the model, not from an upstream direction
        require_extras(who, extra, "value_fn")
        if params is None:
            raise TypeError(
                f"{who} needs params in update(): pass update(grad, state, params, ...)"
            )
        value_fn = extra["value_fn"]
        residual_fn = extra.get("residual_fn")
        curvature = extra.get("curvature")
        if marquardt and residual_fn is None:
            raise TypeError(
                f"{who} needs the residual_fn extra (D = diag(J^T J) comes from the Jacobian); "
                "use sf.least_squares(residual_fn, params), or levenberg() for general losses"
            )
        if extra.get("value") is None or extra.get("grad") is None:
            value, grad = value_and_grad(value_fn)(params)
        else:
            value, grad = extra["value"], extra["grad"]
        n = sum(leaf.numel() for leaf in tree.leaves(params))
        use_dense = (
            residual_fn is not None
            and curvature is None
            and (solver == "dense" or (solver == "auto" and n <= options["dense_max_params"]))
        )
        more = rule == "more" or (rule == "auto" and use_dense)
        if more and not use_dense:
            raise ValueError(
                f"{who}: damping_rule='more' needs the dense least-squares solver (an SVD of "
                "the Jacobian): pass residual_fn, no upstream curvature, and solver='dense' "
                "(or 'auto' with at most dense_max_params parameters); or use 'nielsen'"
            )
        if use_dense:
            model = dense_model(state, params, residual_fn, value_fn, more)
        else:
            scale = state.scale
            if marquardt:
                jac, _ = dense_jacobian(residual_fn, params)
                charge(value_fn, hvp=jac.shape[1])
                column_sq = tree.unravel((jac * jac).sum(0), params)
                scale = tree.map(
                    lambda a, b: floor_scale(torch.maximum(a, b)), state.scale, column_sq
                )
            if curvature is not None:
                operator = curvature
            elif residual_fn is not None:
                operator = least_squares_operator(params, residual_fn, value_fn)
            else:
                _, _, operator = linearize_grad(value_fn, params)
            model = krylov_model(state, params, grad, operator, value_fn, scale)
        trial = tree.add(params, model.step)
        if use_dense:  # the trial's Jacobian gives its value and gradient, and is kept
            trial_jac, trial_r = dense_jacobian(residual_fn, trial)
            charge(value_fn, hvp=trial_jac.shape[1], value=1)
            trial_value = 0.5 * torch.dot(trial_r, trial_r)
            trial_grad = tree.unravel(trial_jac.T @ trial_r, params)
        else:
            trial_value, trial_grad = value_and_grad(value_fn)(trial)
        ratio = gain_ratio(value - trial_value, model.predicted)
        ratio = torch.where(model.valid, ratio, torch.full_like(ratio, -torch.inf))
        accepted = ratio > options["accept_ratio"]
        radius = state.radius
        if more:
            radius = more_radius_update(
                model.radius, ratio, model.scaled_norm, model.initial_damping, value,
                trial_value, model.model_decrease,
            )  # fmt: skip
            new = DampingUpdate(model.initial_damping, state.nu)
        elif rule in ("nielsen", "auto"):
            new = nielsen_update(model.initial_damping, state.nu, ratio, accepted)
        else:
            new = multiply_update(
                model.initial_damping,
                state.nu,
                accepted,
                increase_factor=options["increase_factor"],
                decrease_factor=options["decrease_factor"],
            )
        cache = {"jacobian": state.jacobian, "residuals": state.residuals}
        cache["jacobian_at"] = state.jacobian_at
        if use_dense:
            cache = {
                "jacobian": torch.where(accepted, trial_jac, model.jacobian),
                "residuals": torch.where(accepted, trial_r, model.residuals),
                "jacobian_at": tree.ravel(tree.where(accepted, trial, params)).flat,
            }
        damping = torch.clamp(new.damping, options["min_damping"], options["max_damping"])
        step_norm = tree.norm(model.step)
        stalled = step_norm <= options["step_rtol"] * (tree.norm(params) + options["step_rtol"])
        failed = ~accepted & ((damping >= options["max_damping"]) | stalled)
        if more:  # the radius collapsed below working precision (MINPACK's xtol test)
            scaled_x = tree.norm(tree.map(lambda s, x: torch.sqrt(s) * x, model.scale, params))
            failed = failed | (~accepted & (radius <= options["step_rtol"] * scaled_x))
        new_state = LevenbergState(
            damping=damping,
            nu=new.nu,
            ratio=ratio,
            step_accepted=accepted,
            search_failed=failed,
            next_value=torch.where(accepted, trial_value, value),
            next_grad=tree.where(accepted, trial_grad, grad),
            scale=model.scale,
            **cache,
            radius=radius,
        )
        step = tree.where(accepted, model.step, tree.zeros_like(params))
        return step, new_state

    def publish(state: LevenbergState, params=None, **extra) -> dict[str, Any]:
        return {
            "next_value": state.next_value,
            "next_grad": state.next_grad,
            "next_value_fn": extra.get("value_fn"),
            "damping": state.damping,
            "ratio": state.ratio,
            "step_accepted": state.step_accepted,
            "search_failed": state.search_failed,
        }

    return Transform(init, update, publish)


def levenberg(
    *,
    tau: float = 1e-3,
    initial_damping: float | None = None,
    accept_ratio: float = 1e-4,
    damping_rule: str = "nielsen",
    increase_factor: float = 10.0,
    decrease_factor: float = 10.0,
    min_damping: float = 1e-20,
    max_damping: float = 1e20,
    solver: str = "auto",
    dense_max_params: int = 200,
    cg_rtol: float = 1e-6,
    step_rtol: float = 1e-14,
) -> Transform:
    """Levenberg's method: ``(B + lam I) d = -g`` with gain-ratio damping control.

    Args:
      tau: the first damping is ``tau * max_i (J^T J)_ii`` (MNT eq. (3.14)); in the
        matrix-free modes ``tau * |<g, B g>| / |g|^2`` (a Rayleigh quotient of ``B``).
      initial_damping: a fixed first damping instead of the ``tau`` rule.
      accept_ratio: accept the trial point when ``rho > accept_ratio``.
      damping_rule: ``"nielsen"`` (default), ``"multiply"`` (``lam / decrease_factor``
        on acceptance, ``lam * increase_factor`` on rejection), ``"more"`` (Moré's
        trust radius, dense least squares only; ``tau``, ``initial_damping`` and the
        factors are then unused) or ``"auto"`` (``"more"`` with the dense solver, else
        ``"nielsen"``).
      min_damping, max_damping: bounds on ``lam``; reaching ``max_damping`` on a rejected
        step publishes ``search_failed``.
      solver: ``"auto"``, ``"dense"`` (QR, least squares only) or ``"cg"`` (matrix-free).
      dense_max_params: ``"auto"`` uses the dense solver up to this many parameters.
      cg_rtol: relative residual tolerance of the CG solve.
      step_rtol: a rejected step shorter than ``step_rtol * (|x| + step_rtol)`` means no
        progress is possible at working precision: ``search_failed`` is published.

    Needs ``value_fn`` (and ``residual_fn`` for the least-squares model); publishes
    ``next_value``, ``next_grad``, ``next_value_fn``, ``damping``, ``ratio``,
    ``step_accepted`` and ``search_failed``. The incoming updates are not used.
    """
    return _make(
        "levenberg",
        False,
        tau=tau, initial_damping=initial_damping, accept_ratio=accept_ratio,
        damping_rule=damping_rule, increase_factor=increase_factor,
        decrease_factor=decrease_factor, min_damping=min_damping, max_damping=max_damping,
        solver=solver, dense_max_params=dense_max_params, cg_rtol=cg_rtol, step_rtol=step_rtol,
    )  # fmt: skip


def levenberg_marquardt(
    *,
    tau: float = 1e-3,
    initial_damping: float | None = None,
    accept_ratio: float = 1e-4,
    damping_rule: str = "auto",
    increase_factor: float = 10.0,
    decrease_factor: float = 10.0,
    min_damping: float = 1e-20,
    max_damping: float = 1e20,
    solver: str = "auto",
    dense_max_params: int = 200,
    cg_rtol: float = 1e-6,
    step_rtol: float = 1e-14,
) -> Transform:
    """Levenberg-Marquardt: ``(J^T J + lam D) d = -J^T r`` with ``D = diag(J^T J)``
    (running maximum, Moré 1978), for least squares (needs the ``residual_fn`` extra).

    By default (``damping_rule="auto"``) the dense solver takes Moré's trust-region
    control of ``lam`` (MINPACK ``lmder``), the matrix-free one Nielsen's rule, where the
    damping is relative to the scale ``D``, so the first one is ``tau`` itself (or
    ``initial_damping``). The other arguments are those of :func:`levenberg`. This is
    the default optimizer of :func:`soo_func.least_squares`. With Moré's rule the state's
    ``radius`` is the bound on ``|D^(1/2) d|`` and the published ``damping`` the last
    ``lam``.
    """
    return _make(
        "levenberg_marquardt",
        True,
        tau=tau, initial_damping=initial_damping, accept_ratio=accept_ratio,
        damping_rule=damping_rule, increase_factor=increase_factor,
        decrease_factor=decrease_factor, min_damping=min_damping, max_damping=max_damping,
        solver=solver, dense_max_params=dense_max_params, cg_rtol=cg_rtol, step_rtol=step_rtol,
    )  # fmt: skip
