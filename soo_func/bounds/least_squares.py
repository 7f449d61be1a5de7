"""Bounded least squares: :func:`trust_region_reflective`, a trust-region reflective method for
``min 0.5 |r(x)|^2`` subject to ``lower <= x <= upper``, in the manner of scipy's ``trf``.

Each update, at a feasible ``x`` with the dense Jacobian ``J`` (m x n, ``torch.func.jacfwd``)
and residuals ``r``:

1. the Coleman-Li scaling ``v``, the scaled model ``psi`` and the thin SVD of its
   augmented matrix (:mod:`soo_func.bounds.reflective_step`; Coleman & Li 1996, Branch,
   Coleman & Li 1999);
2. trials, as in BCL99's algorithm: the trust-region step on ``|s_hat| <= radius`` (Moré
   1978 section 5), kept strictly feasible by the truncated / reflected / scaled Cauchy
   choice with ``theta = max(0.995, 1 - |v * g|_inf)``, evaluated once (one residual
   evaluation); the trial is accepted when the cost decreases, and the radius follows
   N&W Algorithm 4.1 on the ratio ``rho`` of actual to predicted (``psi``) reduction:
   ``radius = 0.25 |s_hat|`` when ``rho < 0.25``, doubled when ``rho > 0.75`` and
   ``|s_hat| > 0.95 radius``. A rejected trial (or a non-finite residual) shrinks the radius
   and the update tries again, up to ``max_trials`` times;
3. the Jacobian at the accepted point (``n`` forward products), which gives the driver
   its value ``0.5 |r|^2`` and gradient ``J^T r`` and is kept for the next update.

Active bounds. Coleman-Li iterates approach a bound geometrically but never reach it; an
entry whose trial lands within ``eps_k * max(1, |bound|)`` of a bound its gradient pushes
towards is put on that bound: Bertsekas' epsilon-active set ("Projected Newton methods for
optimization problems with simple constraints", SIAM J. Control Optim. 20(2), 1982) with
``eps_k = min(snap_rtol, sqrt(w_k))``, ``w_k = ||P(x - g) - x||_inf`` (the identification
function of Facchinei, Fischer & Kanzow, SIAM J. Optim. 9(1), 1998: it shrinks to zero at a
stationary point, so entries near but off a bound are not snapped there). A snapped trial
that is rejected is retried without the snap. ``sf.active_bounds(result.params, lower,
upper)`` then reports the active set. On a bound with the gradient pushing out, ``v_i = 0``
holds the entry there until the gradient turns.

The transform is a whole optimizer, used alone:
``sf.least_squares(residual_fn, x0, sf.trust_region_reflective(lower=0.0))``. It needs the
``residual_fn`` extra (which :func:`~soo_func.least_squares` passes) and publishes
``next_value`` / ``next_grad``, ``search_failed``, ``num_active_bounds``, ``radius``,
``ratio`` and ``projected_grad_inf`` (``||P(x - g) - x||_inf``, which the driver's ``gtol``
tests instead of ``||g||_inf``). Every point it evaluates or hands on lies in the box.

Counting (the driver's ``CountedObjective``): a trial is one residual evaluation, a
Jacobian ``n`` Hessian products (plus one residual evaluation when it is not at a trial
point, at the first update). The Jacobian is reused when the point, value and gradient the
driver passes are the ones this transform published. It decides on the host (eager).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.func as tf

from soo_func import tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.bounds.box import Box, bounded_publish, flat_box, projected_gradient_norm
from soo_func.bounds.reflective_step import (
    ScaledModel,
    coleman_li_scaling,
    model_value,
    scaled_model,
    select_step,
    trust_region_solution,
)
from soo_func.bounds.search import feasible_step
from soo_func.checks import BOUNDED_INSTEAD, refuse_vmap
from soo_func.options import check_int_at_least, check_nonnegative, check_positive
from soo_func.oracles import charge, raw_function

PyTree = Any
WHO = "trust_region_reflective"
#: A predicted reduction at most ``ROUNDING * eps * cost`` ends the trials (search_failed).
ROUNDING = 4.0
#: A snap to the bounds is taken when it keeps this fraction of the model's decrease.
SNAP_KEEP = 0.9

__all__ = ["ReflectiveState", "trust_region_reflective"]


class ReflectiveState(NamedTuple):
    """The state of :func:`trust_region_reflective` (0-d unless noted): the radius
    (non-positive before the first update), the Jacobian (m x n) and residuals at the
    flat point ``at``, and what the last update found."""

    radius: torch.Tensor
    jacobian: torch.Tensor
    residuals: torch.Tensor
    at: torch.Tensor
    next_value: torch.Tensor
    next_grad: PyTree
    search_failed: torch.Tensor
    ratio: torch.Tensor
    num_active_bounds: torch.Tensor
    projected_grad_inf: torch.Tensor


class Trial(NamedTuple):
    """The outcome of an update's trials: the flat step (zero when none was accepted), the
    residuals there, the ratio, the next radius, whether a step was accepted."""

    delta: torch.Tensor
    residuals: torch.Tensor
    ratio: float
    radius: float
    accepted: bool


def flat_residuals(out: PyTree) -> torch.Tensor:
    """A residual pytree as one flat vector."""
    return torch.cat([leaf.reshape(-1) for leaf in tree.leaves(out)])


def flat_jacobian(residual_fn: Any, params: PyTree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, r)`` of the flattened residuals at ``params`` (one ``jacfwd``: ``n`` ``jvp``s
    of the raw function; charges nothing)."""
    raveled = tree.ravel(params)
    raw = raw_function(residual_fn)

    def both(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = flat_residuals(raw(tree.unravel(flat, raveled)))
        return r, r

    return tf.jacfwd(both, has_aux=True)(raveled.flat)


def snap_to_bounds(target: torch.Tensor, g: torch.Tensor, box: Box, rtol: float) -> torch.Tensor:
    """``target`` with the entries within ``rtol * max(1, |bound|)`` of a bound that ``g``
    pushes towards (``g > 0`` at a lower bound, ``g < 0`` at an upper one) put on it."""
    one = torch.ones_like(target)
    lower, upper = box.lower, box.upper
    near_lower = (g > 0) & (target - lower <= rtol * torch.maximum(lower.abs(), one))
    near_upper = (g < 0) & (upper - target <= rtol * torch.maximum(upper.abs(), one))
    near_lower = near_lower & torch.isfinite(lower)
    near_upper = near_upper & torch.isfinite(upper)
    return torch.where(near_lower, box.lower, torch.where(near_upper, box.upper, target))


def next_radius(radius: float, ratio: float, step_norm: float) -> float:
    """N&W Algorithm 4.1 with Moré's shrink to a quarter of the step taken."""
    if ratio < 0.25:
        return 0.25 * step_norm
    if ratio > 0.75 and step_norm > 0.95 * radius:
        return 2.0 * radius
    return radius


def default_radius(x: torch.Tensor, d: torch.Tensor) -> float:
    """``|D x|`` (Moré 1978's ``factor * |D x_0|`` with factor 1, as scipy's ``trf``), or 1
    when it is zero or not finite."""
    scaled = float(
        torch.linalg.vector_norm(torch.where(d > 0, x / torch.where(d > 0, d, 1.0), 0.0))
    )
    return scaled if 0 < scaled < math.inf else 1.0


class Proposal(NamedTuple):
    """A trial step: flat ``delta`` (``x + delta`` in the box), its scaled ``s_hat``, the
    model's predicted reduction ``-psi(s_hat)``, whether entries were snapped to bounds."""

    delta: torch.Tensor
    s_hat: torch.Tensor
    predicted: float
    snapped: bool


def propose(x: torch.Tensor, box: Box, model: ScaledModel, s_hat: torch.Tensor,
            g: torch.Tensor, snap: float, floor: float) -> Proposal | None:  # fmt: skip
    """The trial step for the scaled step ``s_hat``, snapped to the bounds within ``snap``
    when the snap keeps ``SNAP_KEEP`` of the model's decrease; ``None`` when it leaves ``x``
    unchanged or predicts a decrease of at most ``floor`` (the cost's rounding)."""
    target = box.project(x + model.d * s_hat)
    plain = None
    for snapping in (True, False) if snap > 0 else (False,):
        moved = snap_to_bounds(target, g, box, snap) if snapping else target
        if snapping and not bool((moved != target).any()):
            continue
        delta = feasible_step(x, moved, box)
        if not bool((x + delta != x).any()):
            continue
        scaled = torch.where(model.d > 0, delta / torch.where(model.d > 0, model.d, 1.0), 0.0)
        predicted = -float(model_value(model, scaled))
        if not snapping:
            plain = Proposal(delta, scaled, predicted, False)
        elif predicted > floor and predicted >= SNAP_KEEP * -float(model_value(model, s_hat)):
            return Proposal(delta, scaled, predicted, True)
    return plain if plain is not None and plain.predicted > floor else None


def trust_region_reflective(
    lower: Any = None,
    upper: Any = None,
    *,
    max_trials: int = 30,
    initial_radius: float | None = None,
    snap_rtol: float = 1e-4,
) -> Transform:
    """The trust-region reflective method for bounded least squares (module docstring).

    Args:
      lower, upper: ``None``, a number, or a pytree like the params of tensors that
        broadcast to its leaves; ``-inf`` / ``+inf`` entries are absent bounds.
      max_trials: the most trial points per update (each one residual evaluation); an
        update with no decrease publishes ``search_failed`` with a zero step.
      initial_radius: the first trust radius on ``|D s|`` (default ``|D x_0|``, or 1).
      snap_rtol: a trial entry within ``min(snap_rtol, sqrt(w)) * max(1, |bound|)`` of a
        bound its gradient pushes towards is put on it, ``w = ||P(x - g) - x||_inf`` at the
        current point (0: never; module docstring).


    The params must be feasible (``sf.project_to_bounds`` gives a feasible start); an
    infeasible point raises.
    """
    check_int_at_least(WHO, "max_trials", max_trials, 1)
    if initial_radius is not None:
        check_positive(WHO, "initial_radius", initial_radius)
    check_nonnegative(WHO, "snap_rtol", snap_rtol)

    def init(params: PyTree) -> ReflectiveState:
        flat_box(lower, upper, params)  # bounds that do not fit the params raise here
        x = tree.ravel(params).flat
        zero = x.new_zeros(())
        count = torch.zeros((), dtype=torch.int64, device=x.device)
        false = torch.zeros((), dtype=torch.bool, device=x.device)
        inf = torch.full_like(zero, math.inf)
        return ReflectiveState(
            radius=zero, jacobian=x.new_zeros(0, 0), residuals=x.new_zeros(0),
            at=x.new_zeros(0), next_value=inf, next_grad=tree.zeros_like(params),
            search_failed=false, ratio=zero, num_active_bounds=count, projected_grad_inf=inf,
        )  # fmt: skip

    def current_jacobian(state, params, x, extra) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept Jacobian when the driver hands back the point, value and gradient this
        transform published, else a fresh one (``n`` products and one residual)."""
        value, grad = extra.get("value"), extra.get("grad")
        if state.at.shape == x.shape and value is not None and grad is not None:
            same = (state.at == x).all() & (state.next_value == value)
            same = same & (tree.ravel(state.next_grad).flat == tree.ravel(grad).flat).all()
            if bool(same):
                return state.jacobian, state.residuals
        jac, r = flat_jacobian(extra["residual_fn"], params)
        charge(extra["residual_fn"], value=1, hvp=jac.shape[1])
        return jac, r

    def trials(residual_fn, params, x, box, jac, r, radius) -> Trial:
        """BCL99's inner loop: trial steps until the cost decreases (module docstring)."""
        g = jac.T @ r
        cost = 0.5 * float(torch.dot(r, r))
        v, dv = coleman_li_scaling(x, g, box)
        model = scaled_model(jac, r, g, v, dv)
        theta = max(0.995, 1.0 - float((v * g).abs().amax())) if x.numel() else 0.995
        radius = radius if radius > 0 else initial_radius or default_radius(x, model.d)
        snap = min(snap_rtol, math.sqrt(float(projected_gradient_norm(x, g, box))))
        floor = ROUNDING * torch.finfo(x.dtype).eps * cost
        ratio = 0.0
        for _ in range(max_trials):
            s_hat = select_step(x, box, model, trust_region_solution(model, radius), radius, theta)
            proposal = propose(x, box, model, s_hat, g, snap, floor)
            if proposal is None:
                break  # no change of x or no decrease its rounding could show: x is final
            delta, s_hat, predicted, snapping = proposal
            step_norm = float(torch.linalg.vector_norm(s_hat))
            r_new = flat_residuals(residual_fn(tree.add(params, tree.unravel(delta, params))))
            cost_new = 0.5 * float(torch.dot(r_new, r_new))
            if not math.isfinite(cost_new):
                radius = 0.25 * step_norm
                continue
            actual = cost - cost_new
            ratio = actual / predicted if predicted > 0 else -math.inf
            if actual > 0:
                return Trial(delta, r_new, ratio, next_radius(radius, ratio, step_norm), True)
            if snapping:  # a rejected snap: retry the same radius without it
                snap = 0.0
                continue
            radius = next_radius(radius, ratio, step_norm)
        return Trial(torch.zeros_like(x), r, ratio, radius, False)

    def update(updates: PyTree, state: ReflectiveState, params: PyTree = None, **extra: Any):
        require_extras(WHO, extra, "residual_fn")
        refuse_vmap(WHO, "each trial step's predicted and actual reductions", BOUNDED_INSTEAD)
        if params is None:
            raise TypeError(f"{WHO} needs params in update(updates, state, params, ...)")
        residual_fn = extra["residual_fn"]
        box = flat_box(lower, upper, params)
        x = tree.ravel(params).flat
        if not bool((box.project(x) == x).all()):
            raise ValueError(
                f"{WHO}: the params lie outside the bounds; start from a feasible point, "
                "e.g. sf.project_to_bounds(params, lower, upper)"
            )
        jac, r = current_jacobian(state, params, x, extra)
        found = trials(residual_fn, params, x, box, jac, r, float(state.radius))
        new_params = tree.add(params, tree.unravel(found.delta, params))
        if found.accepted:
            jac, _ = flat_jacobian(residual_fn, new_params)
            charge(residual_fn, hvp=jac.shape[1])
        r = found.residuals
        new_x = tree.ravel(new_params).flat
        grad = jac.T @ r
        as_tensor = torch.tensor
        new_state = ReflectiveState(
            radius=as_tensor(found.radius, dtype=x.dtype, device=x.device),
            jacobian=jac,
            residuals=r,
            at=new_x,
            next_value=0.5 * torch.dot(r, r),
            next_grad=tree.unravel(grad, params),
            search_failed=as_tensor(not found.accepted, device=x.device),
            ratio=as_tensor(found.ratio, dtype=x.dtype, device=x.device),
            num_active_bounds=((new_x <= box.lower) | (new_x >= box.upper)).sum(),
            projected_grad_inf=projected_gradient_norm(new_x, grad, box),
        )
        return tree.unravel(found.delta, params), new_state

    def publish(state: ReflectiveState, params: PyTree = None, **extra: Any) -> dict[str, Any]:
        published = bounded_publish(state, extra.get("value_fn"))
        return {**published, "radius": state.radius, "ratio": state.ratio}

    return guarded(WHO, Transform(init, update, publish), ReflectiveState)
