"""Path tools for :mod:`soo_func.continuation`: the path tangent, parameter paths,
memory resets at stage changes (and the argument checks of ``homotopy``).

* :func:`path_tangent` -- ``dx/dt`` of the path of minimizers of ``f_t`` (matrix-free).
* :func:`continuation_path` -- solutions of ``value_fn(params, lam)`` over a schedule of
  ``lam`` (a regularization path, say): one :func:`~soo_func.minimize` per value, warm
  started from the previous solution moved along :func:`path_tangent` (the homotopy's
  predictor). It does not chain :func:`~soo_func.continuation.homotopy` with a fixed
  schedule (which works, see the tests) because there the driver re-evaluates its own
  objective at every step while ``t < 1``, which costs more evaluations than the
  warm starts save: ``recover_objective`` removes that evaluation only for the built-in
  families, where ``f`` follows exactly from ``f_t``; a user family ``value_fn(p, lam)``
  has no such map.
* :func:`reset_at_stage_change` -- wraps a direction with a memory (L-BFGS, BFGS) so
  that its state restarts when the homotopy changes the objective.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optree
import torch
import torch.func as tf

from soo_func import tree
from soo_func.base import Transform
from soo_func.krylov import minres
from soo_func.oracles import CountedObjective, charge, hvp

PyTree = Any
Family = Callable[[PyTree, torch.Tensor], torch.Tensor]

__all__ = ["PathResult", "continuation_path", "path_tangent", "reset_at_stage_change"]


def _family_fn(family: str | Family, base: Callable, state: Any) -> Family:
    """``(p, t) -> f_t(p)`` for the built-in families (``base`` is the raw ``f``; ``state`` a
    :class:`~soo_func.continuation.HomotopyState`)."""
    if callable(family):
        return family
    if family == "keller":
        return lambda p, t: base(p) - (1 - t) * tree.vdot(state.anchor_grad, p)
    return lambda p, t: (
        t * base(p) + (1 - t) * 0.5 * state.scale * tree.sum_of_squares(tree.sub(p, state.anchor))
    )


def _compose(family: str, t, x, f_value, f_grad, state: Any):
    """``f_t`` and its gradient at ``x`` from ``f`` and its gradient there (built-ins)."""
    c = 1 - t
    if family == "keller":
        return f_value - c * tree.vdot(state.anchor_grad, x), tree.axpy(
            -c, state.anchor_grad, f_grad
        )
    diff = tree.sub(x, state.anchor)
    value = t * f_value + c * 0.5 * state.scale * tree.sum_of_squares(diff)
    return value, tree.add(tree.scale(t, f_grad), tree.scale(c * state.scale, diff))


class _ChargedObjective(CountedObjective):
    """``fn`` as a counted objective whose evaluations are charged to ``charge_to``."""

    def __init__(self, fn: Callable, charge_to: Any):
        self.fn = fn
        self._target = charge_to if isinstance(charge_to, CountedObjective) else None
        self._own = {"num_value_evals": 0, "num_grad_evals": 0, "num_hvp_evals": 0}

    def _get(name):  # noqa: N805 - property factory
        def get(self):
            return getattr(self._target, name) if self._target is not None else self._own[name]

        def set_(self, value):
            if self._target is not None:
                setattr(self._target, name, value)
            else:
                self._own[name] = value

        return property(get, set_)

    num_value_evals = _get("num_value_evals")
    num_grad_evals = _get("num_grad_evals")
    num_hvp_evals = _get("num_hvp_evals")
    del _get


def _raw(fn: Callable) -> Callable:
    return fn.fn if isinstance(fn, CountedObjective) else fn


def _recovery(family, state: Any, min_t: float) -> Callable | None:
    """``(value_t, grad_t, x) -> (f(x), grad f(x))`` for the built-in families, exact:

    Keller: ``f = f_t + (1 - t) <g0, x>``, ``grad f = grad f_t + (1 - t) g0``; convex
    (``t >= min_t``, since dividing by ``t`` amplifies rounding by ``1/t``):
    ``f = (f_t - (1 - t)(scale/2)|x - x0|^2) / t``,
    ``grad f = (grad f_t - (1 - t) scale (x - x0)) / t``. ``None`` for user families.
    """
    if callable(family):
        return None
    t = state.t
    c = 1 - t
    if family == "keller":

        def recover_keller(value_t, grad_t, x):
            return value_t + c * tree.vdot(state.anchor_grad, x), tree.axpy(
                c, state.anchor_grad, grad_t
            )

        return recover_keller
    if not bool(t >= min_t):
        return None

    def recover_convex(value_t, grad_t, x):
        diff = tree.sub(x, state.anchor)
        value = (value_t - c * 0.5 * state.scale * tree.sum_of_squares(diff)) / t
        return value, tree.scale(1 / t, tree.axpy(-c * state.scale, diff, grad_t))

    return recover_convex


_SCHEDULES = ("linear", "exponential")


def _check_homotopy_args(family, schedule, **numbers: float) -> None:
    if not callable(family) and family not in ("keller", "convex"):
        raise ValueError(
            f"homotopy: family must be 'keller', 'convex' or a callable family(params, t), "
            f"got {family!r}"
        )
    if isinstance(schedule, str):
        if schedule not in _SCHEDULES:
            raise ValueError(
                f"homotopy: schedule must be 'linear', 'exponential' or an increasing sequence "
                f"of t values ending at 1, got {schedule!r}"
            )
    else:
        points = [float(s) for s in schedule]
        if not points or points[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(points)):
            raise ValueError(
                f"homotopy: a fixed schedule must be strictly increasing and end at 1.0, got {points}"
            )
        if points[0] < 0:
            raise ValueError(f"homotopy: schedule values must lie in [0, 1], got {points}")
    for name, value in numbers.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"homotopy: {name} must be a positive finite number, got {value!r}")
    if numbers["grow"] < 1:
        raise ValueError(f"homotopy: grow must be >= 1, got {numbers['grow']}")
    if not numbers["shrink"] < 1:
        raise ValueError(f"homotopy: shrink must be in (0, 1), got {numbers['shrink']}")


def path_tangent(
    family_fn: Family,
    x: PyTree,
    t: torch.Tensor,
    *,
    rtol: float = 1e-8,
    max_iters: int | None = None,
) -> PyTree:
    """The tangent ``dx/dt = -(d^2 f_t/dx^2)^{-1} d/dt grad f_t`` of the path at ``(x, t)``.

    Implicit differentiation of ``grad_x f_t(x(t)) = 0`` (Allgower & Georg eq. (2.1.9)):
    ``d/dt grad f_t`` is one ``jvp`` of ``grad_x f_t`` in ``t``; the Hessian solve is
    MINRES (Paige & Saunders 1975) on Hessian-vector products of ``f_t``. When
    ``family_fn`` is a :class:`~soo_func.CountedObjective` the ``jvp`` and each product
    are charged to it as Hessian products.
    """
    raw = _raw(family_fn)
    t = torch.as_tensor(t, dtype=tree.leaves(x)[0].dtype, device=tree.leaves(x)[0].device)

    def grad_at(s):
        return tf.grad(lambda p: raw(p, s))(x)

    _, dgrad_dt = tf.jvp(grad_at, (t,), (torch.ones_like(t),))
    # forward AD through Python-scalar products can promote float32 tangents to float64
    dgrad_dt = tree.map(lambda d, p: d.to(p.dtype), dgrad_dt, x)
    charge(family_fn, hvp=1)

    def objective_t(p):
        return raw(p, t)

    def matvec(v):
        charge(family_fn, hvp=1)
        return tree.map(lambda hv, p: hv.to(p.dtype), hvp(objective_t, x, v), x)

    n = sum(leaf.numel() for leaf in tree.leaves(x))
    iters = max_iters if max_iters is not None else min(2 * n, 200)
    return minres(matvec, tree.neg(dgrad_dt), max_iters=iters, rtol=rtol).x


def reset_at_stage_change(direction: Transform) -> Transform:
    """Wrap ``direction`` so that its state restarts when a homotopy changes the objective.

    A quasi-Newton memory holds pairs ``(s, y)`` of one objective; across a stage change
    of :func:`~soo_func.continuation.homotopy` (a new ``t``, and a predictor jump that the
    direction does not see as a step) its newest pair mixes two objectives and two
    points. The wrapper reads the ``continuation_restart`` flag that the homotopy
    publishes (true on the update that starts a stage and on the one after it) and
    replaces the state by ``direction.init(params)`` there, with ``torch.where`` (no
    host sync). Use it as ``chain(homotopy("convex"), reset_at_stage_change(lbfgs()), wolfe())``
    (the arclength follower publishes the flag too: true whenever it moved the point).
    """

    def update(updates, state, params=None, **extra):
        restart = extra.get("continuation_restart")
        if restart is not None:
            if params is None:
                raise TypeError("reset_at_stage_change needs params to re-initialize the state")
            fresh = direction.init(params)
            state = optree.tree_map(lambda new, old: torch.where(restart, new, old), fresh, state)
        return direction.update(updates, state, params, **extra)

    return Transform(direction.init, update, direction.publish)


@dataclass
class PathResult:
    """What :func:`continuation_path` returns: ``params[k]`` minimizes
    ``value_fn(., schedule[k])``; the counts cover the whole path."""

    schedule: list[float]
    params: list[PyTree]
    values: list[float]
    grad_norms: list[float]
    num_steps: int
    num_value_evals: int
    num_grad_evals: int
    num_hvp_evals: int
    converged: bool
    history: list[dict[str, float]] = field(default_factory=list)


def continuation_path(
    value_fn: Callable[[PyTree, torch.Tensor], torch.Tensor],
    params: PyTree,
    optimizer: Transform,
    schedule: Sequence[float],
    *,
    gtol: float = 1e-8,
    max_steps: int = 1000,
    predictor: str = "tangent",
) -> PathResult:
    """Minimize ``value_fn(params, lam)`` for each ``lam`` in ``schedule`` in turn.

    Each solve is :func:`~soo_func.minimize` on ``value_fn(., lam_k)`` started from the
    previous solution moved along the path tangent (a warm start with the Euler
    predictor of Allgower & Georg Algorithm 2.2.3):
    ``x_start = x_{k-1} + (lam_k - lam_{k-1}) dx/dlam``, ``dx/dlam`` from
    :func:`path_tangent` (the same predictor :func:`~soo_func.continuation.homotopy`
    uses). The predicted point is kept only when its value is below that of
    ``x_{k-1}`` (two value evaluations). A point counts as solved when
    ``|grad|_inf <= gtol``. The evaluation counts cover every solve and predictor.

    Args:
      value_fn: ``(params, lam) -> 0-d loss`` (``lam`` is a 0-d tensor).
      params: the starting point of the first solve.
      optimizer: the corrector, e.g. ``chain(newton_krylov(), armijo())``.
      schedule: the parameter values in the order to solve them (strong to weak
        regularization, say).
      gtol: the gradient tolerance at every point of the path.
      max_steps: the most optimizer steps per point.
      predictor: ``"tangent"`` or ``"none"`` (warm start only).
    """
    from soo_func.drivers.minimize import minimize

    values = [float(s) for s in schedule]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"continuation_path: schedule must be finite numbers, got {values}")
    if predictor not in ("tangent", "none"):
        raise ValueError(
            f"continuation_path: predictor must be 'tangent' or 'none', got {predictor!r}"
        )
    ref = tree.leaves(params)[0]
    lams = [torch.tensor(v, dtype=ref.dtype, device=ref.device) for v in values]
    counted = CountedObjective(value_fn)
    points, history, grad_norms, final_values = [], [], [], []
    counts = [0, 0, 0, 0]
    converged = True
    start = params
    for k, lam in enumerate(lams):
        if k > 0 and predictor == "tangent":
            tangent = path_tangent(counted, points[-1], lams[k - 1], rtol=1e-4)
            guess = tree.axpy(lam - lams[k - 1], tangent, points[-1])
            if bool(counted(guess, lam) < counted(points[-1], lam)):
                start = guess
        result = minimize(
            lambda p, lam=lam: value_fn(p, lam), start, optimizer, gtol=gtol, max_steps=max_steps
        )
        counts = [
            counts[0] + result.num_value_evals, counts[1] + result.num_grad_evals,
            counts[2] + result.num_hvp_evals, counts[3] + result.num_steps,
        ]  # fmt: skip
        converged = converged and result.converged
        points.append(result.params)
        final_values.append(float(result.value))
        grad_norms.append(float(tree.norm(result.grad, math.inf)))
        history.extend(dict(row, lam=values[k]) for row in result.history)
        start = result.params
    return PathResult(
        schedule=values,
        params=points,
        values=final_values,
        grad_norms=grad_norms,
        num_steps=counts[3],
        num_value_evals=counts[0] + counted.num_value_evals,
        num_grad_evals=counts[1] + counted.num_grad_evals,
        num_hvp_evals=counts[2] + counted.num_hvp_evals,
        converged=converged,
        history=history,
    )
