"""Trust regions: the classical radius update around an upstream quadratic model.

At ``x`` with value ``f``, gradient ``g`` and the curvature ``B`` published by the
direction before it (``curvature``: ``v -> B v``), each update solves the subproblem

    min_p  m(p) = f + <g, p> + 0.5 <p, B p>   subject to  |p| <= radius

approximately, evaluates ``f(x + p)`` once, and compares the actual reduction with the
predicted one, ``rho = (f(x) - f(x + p)) / (m(0) - m(p))`` (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., eq. (4.4)). The step is accepted when ``rho > accept_ratio``
(``eta``); the radius follows Algorithm 4.1. The ratio, the radius rule and the
accept/reject selection are shared with Levenberg-Marquardt
(:mod:`soo_func.searches.acceptance`).
A rejected step returns a zero update and the current value and gradient, with the
radius shrunk: nothing else changes, so the next update retries from the same point.

Subproblem solvers:

* ``"steihaug"`` (default): truncated CG of Steihaug (N&W Algorithm 7.2), from
  :func:`soo_func.krylov.steihaug`; any symmetric ``B``, indefinite included.
* ``"dogleg"``: the dogleg path of N&W §4.1 (eqs. (4.15)-(4.16)) between the Cauchy
  point ``-(g.g / g.Bg) g`` and the Newton point, which is the upstream direction
  (``-B^{-1} g`` for a quasi-Newton or Newton direction). For positive definite models;
  where ``<g, B g> <= 0`` it takes the steepest-descent step to the boundary.

The decisions are ``torch.where`` selections (no host synchronisation here; the
Steihaug solver may synchronise inside, see :mod:`soo_func.krylov`). Each update costs
one evaluation of ``value_and_grad(value_fn)`` and one curvature product for the
predicted reduction (plus the subproblem's products).

Publishes ``next_value``, ``next_grad``, ``next_value_fn`` (the driver reuses them),
``radius`` (after the update), ``ratio``, ``step_accepted`` and ``search_failed`` (only
when the radius has collapsed below ``min_radius``: a rejected step is not a failure).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.krylov import steihaug
from soo_func.options import (
    check_in,
    check_int_at_least,
    check_interval,
    check_nonnegative,
    check_positive,
)
from soo_func.oracles import value_and_grad
from soo_func.searches.acceptance import accept_or_stay, radius_update, rounding_safe_ratio

PyTree = Any

__all__ = [
    "SOLVERS",
    "TrustRegionState",
    "dogleg_step",
    "moves_nothing",
    "steihaug_rtol",
    "trust_region",
]

SOLVERS = ("steihaug", "dogleg")


class TrustRegionState(NamedTuple):
    """State of :func:`trust_region` (0-d tensors, ``next_grad`` a pytree like the params).

    ``radius`` is the radius for the next update; ``ratio`` and ``step_accepted`` describe
    the last one; ``next_value``/``next_grad`` are the objective and gradient at
    ``params + updates`` (at ``params`` after a rejection).
    """

    radius: torch.Tensor
    ratio: torch.Tensor
    step_accepted: torch.Tensor
    search_failed: torch.Tensor
    next_value: torch.Tensor
    next_grad: PyTree


def _missing_curvature_error() -> TypeError:
    return TypeError(
        "trust_region needs the quadratic model of the direction before it, published as "
        "'curvature' (v -> B v), and none was published. Chain it after a direction that "
        "publishes one: chain(newton_krylov(), trust_region()), chain(gauss_newton(), "
        "trust_region()), chain(bfgs(), trust_region()) or chain(sr1(), trust_region()); "
        "or pass curvature=... to update()."
    )


def dogleg_step(
    grad: PyTree, newton: PyTree, curvature: Any, radius: torch.Tensor
) -> tuple[PyTree, torch.Tensor]:
    """The dogleg step of N&W §4.1 and ``<g, B g>`` (no host sync).

    ``|p_B| <= radius``: ``p = p_B``. ``|p_U| >= radius`` (or ``<g, B g> <= 0``):
    ``p = -radius g / |g|``. Otherwise ``p = p_U + tau (p_B - p_U)`` with ``tau`` in
    ``[0, 1]`` the root of ``|p_U + tau (p_B - p_U)| = radius`` (eq. (4.16), with
    ``tau - 1`` of the book's parameterisation).
    """
    g_norm_sq = tree.sum_of_squares(grad)
    g_curv = tree.vdot(grad, curvature(grad))
    positive = g_curv > 0
    safe_curv = torch.where(positive, g_curv, torch.ones_like(g_curv))
    cauchy = tree.scale(-(g_norm_sq / safe_curv), grad)
    cauchy_norm = torch.sqrt(g_norm_sq) * g_norm_sq / safe_curv
    g_norm = torch.sqrt(g_norm_sq)
    safe_g_norm = torch.where(g_norm > 0, g_norm, torch.ones_like(g_norm))
    boundary_sd = tree.scale(-radius / safe_g_norm, grad)
    newton_norm = tree.norm(newton)
    # |p_U + tau w|^2 = radius^2 with w = p_B - p_U: a tau^2 + 2 b tau + c = 0, c <= 0.
    w = tree.sub(newton, cauchy)
    a = tree.sum_of_squares(w)
    b = tree.vdot(cauchy, w)
    c = cauchy_norm**2 - radius**2
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    tau = (-b + torch.sqrt(torch.clamp(b * b - a * c, min=0))) / safe_a
    tau = torch.clamp(tau, 0, 1)
    dog = tree.axpy(tau, w, cauchy)
    use_newton = newton_norm <= radius
    use_sd = (~positive) | (cauchy_norm >= radius)
    step = tree.where(use_newton & positive, newton, tree.where(use_sd, boundary_sd, dog))
    return step, g_curv


def moves_nothing(params: PyTree, trial: PyTree) -> torch.Tensor:
    """0-d bool: ``trial == params`` in every coordinate (a step below rounding, or 0)."""
    same = [(a == b).all() for a, b in zip(tree.leaves(params), tree.leaves(trial), strict=True)]
    return torch.stack(same).all()  # on the device: no host read


def steihaug_rtol(grad_norm: torch.Tensor) -> torch.Tensor:
    """N&W eq. (7.3): ``eta_k = min(0.5, sqrt(||g_k||))``, Steihaug-CG's relative tolerance."""
    return torch.clamp(torch.sqrt(grad_norm), max=0.5)


def _validate(
    *, solver, initial_radius, max_radius, min_radius, accept_ratio, shrink_below,
    grow_above, shrink_factor, grow_factor, max_iters, rtol,
):  # fmt: skip
    who = "trust_region"
    check_in(who, "solver", solver, SOLVERS)
    check_positive(who, "initial_radius", initial_radius)
    check_positive(who, "max_radius", max_radius, allow_inf=True)
    check_nonnegative(who, "min_radius", min_radius)
    check_interval(who, "accept_ratio (eta)", accept_ratio, 0, 1, include_low=True)
    check_interval(who, "shrink_below", shrink_below, 0, 1)
    check_interval(who, "grow_above", grow_above, 0, 1)
    check_interval(who, "shrink_factor", shrink_factor, 0, 1)
    check_interval(who, "grow_factor", grow_factor, 1, math.inf)
    if max_iters is not None:
        check_int_at_least(who, "max_iters", max_iters, 1)
    if rtol is not None:
        check_interval(who, "rtol", rtol, 0, 1, include_low=True)
    if not initial_radius <= max_radius:
        raise ValueError(
            f"{who}: need 0 < initial_radius <= max_radius, got {initial_radius} and {max_radius}"
        )
    if not min_radius < initial_radius:
        raise ValueError(
            f"{who}: need 0 <= min_radius < initial_radius, got {min_radius} and {initial_radius}"
        )
    if not shrink_below <= grow_above:
        raise ValueError(
            f"{who}: need 0 < shrink_below <= grow_above < 1 (N&W use 1/4 and 3/4), got "
            f"{shrink_below} and {grow_above}"
        )


def trust_region(
    *,
    solver: str = "steihaug",
    initial_radius: float = 1.0,
    max_radius: float = 1e10,
    min_radius: float = 1e-14,
    accept_ratio: float = 1e-4,
    shrink_below: float = 0.25,
    grow_above: float = 0.75,
    shrink_factor: float = 0.25,
    grow_factor: float = 2.0,
    max_iters: int | None = None,
    rtol: float | None = None,
    warm_start: bool = True,
) -> Transform:
    """A trust region around the upstream direction's quadratic model (N&W Algorithm 4.1).

    Args:
      solver: ``"steihaug"`` (truncated CG, any symmetric model) or ``"dogleg"``
        (positive definite models; the upstream direction is the Newton point).
      initial_radius: the first radius.
      max_radius: the radius never grows beyond this (N&W's ``Delta-hat``).
      min_radius: a rejected step that leaves the radius below this publishes
        ``search_failed`` (the driver then stops: no progress is possible).
      accept_ratio: ``eta``: accept the step when ``rho > eta``.
      shrink_below: ``rho`` below this shrinks the radius (N&W: 1/4).
      grow_above: ``rho`` above this with the step on the boundary grows it (N&W: 3/4).
      shrink_factor: the shrunk radius is ``shrink_factor * min(|p|, radius)`` (N&W: 1/4).
      grow_factor: the grown radius is ``min(grow_factor * radius, max_radius)`` (N&W: 2).
      max_iters: the most Steihaug-CG iterations per update (default ``2 n``).
      rtol: Steihaug-CG's relative tolerance ``||B p + g|| <= rtol ||g||``; ``None``
        (default): the forcing sequence ``min(0.5, sqrt(||g||))`` of N&W eq. (7.3)
        (superlinear near a minimizer, and no over-solving far from it).
      warm_start: Steihaug-CG starts from the upstream direction (the direction's own
        solve of the same model: ``-B^{-1} g`` for a quasi-Newton or Gauss-Newton
        direction, the truncated Newton-Krylov solution) when it lies in the region and
        lowers the model; CG continues from there, so a direction that already solved
        the model costs one product here. ``False``: from ``0`` (N&W Algorithm 7.2).

    Needs the extras ``value``, ``grad``, ``value_fn`` and the published ``curvature``.
    """
    _validate(
        solver=solver, initial_radius=initial_radius, max_radius=max_radius,
        min_radius=min_radius, accept_ratio=accept_ratio, shrink_below=shrink_below,
        grow_above=grow_above, shrink_factor=shrink_factor, grow_factor=grow_factor,
        max_iters=max_iters, rtol=rtol,
    )  # fmt: skip

    def init(params: PyTree) -> TrustRegionState:
        like = tree.leaves(params)[0]
        scalar = {"dtype": like.dtype, "device": like.device}
        return TrustRegionState(
            radius=torch.full((), initial_radius, **scalar),
            ratio=torch.zeros((), **scalar),
            step_accepted=torch.zeros((), dtype=torch.bool, device=like.device),
            search_failed=torch.zeros((), dtype=torch.bool, device=like.device),
            next_value=torch.zeros((), **scalar),
            next_grad=tree.zeros_like(params),
        )

    def subproblem(updates, grad, curvature, radius, skipped) -> tuple[PyTree, torch.Tensor]:
        """The step and its predicted reduction ``m(0) - m(p)``."""
        if solver == "dogleg":
            step = dogleg_step(grad, updates, curvature, radius)[0]
            return step, -(tree.vdot(grad, step) + 0.5 * tree.vdot(step, curvature(step)))
        tol = steihaug_rtol(tree.norm(grad)) if rtol is None else rtol
        warm = updates if warm_start and not skipped else None
        result = steihaug(
            curvature, grad, radius, max_iters=max_iters, rtol=tol, x0=warm, x0_solves_model=True
        )
        return result.x, -result.model_change

    def update(updates, state: TrustRegionState, params=None, **extra):
        require_extras("trust_region", extra, "value_fn", "grad")
        if params is None:
            raise TypeError("trust_region needs params in update(): update(d, state, params, ...)")
        curvature = extra.get("curvature")
        if curvature is None:
            raise _missing_curvature_error()
        value_fn, grad = extra["value_fn"], extra["grad"]
        value = extra.get("value")
        if value is None:
            value = value_fn(params)
        skipped = bool(extra.get("direction_skipped", False))  # a Python flag, not a tensor
        step, predicted = subproblem(updates, grad, curvature, state.radius, skipped)
        # A model whose curvature is not finite along the step (an upstream quasi-Newton
        # matrix with a degenerate pair, an overflow) is judged as the linear model.
        predicted = torch.where(torch.isfinite(predicted), predicted, -tree.vdot(grad, step))
        trial = tree.add(params, step)
        trial_value, trial_grad = value_and_grad(value_fn)(trial)
        # A step below the rounding of every coordinate (x + p == x) cannot make progress:
        # reported as a failed search with a zero step, the run's honest stop at the
        # precision limit (else the radius random-walks on rounding noise forever).
        stuck = moves_nothing(params, trial)
        ratio = rounding_safe_ratio(value, trial_value, predicted)
        accepted = (ratio > accept_ratio) & ~stuck
        radius = radius_update(
            state.radius,
            ratio,
            tree.norm(step),
            shrink_below=shrink_below,
            grow_above=grow_above,
            shrink_factor=shrink_factor,
            grow_factor=grow_factor,
            max_radius=max_radius,
        )
        decision = accept_or_stay(accepted, step, trial_value, trial_grad, value, grad)
        new_state = TrustRegionState(
            radius=radius,
            ratio=ratio,
            step_accepted=accepted,
            search_failed=(~accepted & (radius < min_radius)) | stuck,
            next_value=decision.next_value,
            next_grad=decision.next_grad,
        )
        return decision.step, new_state

    def publish(state: TrustRegionState, params=None, **extra) -> dict[str, Any]:
        return {
            "next_value": state.next_value,
            "next_grad": state.next_grad,
            "next_value_fn": extra.get("value_fn"),
            "radius": state.radius,
            "ratio": state.ratio,
            "step_accepted": state.step_accepted,
            "search_failed": state.search_failed,
        }

    transform = Transform(init, update, publish, solves_model=solver == "steihaug")
    return guarded("trust_region", transform, TrustRegionState)
