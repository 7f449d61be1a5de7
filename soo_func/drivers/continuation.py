"""The continuation driver :func:`continuation_path`: solutions of ``value_fn(params, lam)``
over a schedule of ``lam`` (a regularization path, say).

One :func:`~soo_func.drivers.minimize` per value, warm started from the previous solution
moved along :func:`~soo_func.continuation.path_tangent` (the homotopy's predictor). It does
not chain :func:`~soo_func.continuation.homotopy` with a fixed schedule (which works, see
the tests) because there the driver re-evaluates its own objective at every step while
``t < 1``: ``recover_objective`` removes that evaluation only for the built-in families,
where ``f`` follows exactly from ``f_t``; a user family ``value_fn(p, lam)`` has no such map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from soo_func import tree
from soo_func.base import Transform
from soo_func.continuation import path_tangent
from soo_func.drivers.minimize import minimize
from soo_func.oracles import CountedObjective

PyTree = Any

__all__ = ["PathResult", "continuation_path"]


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


def _checked_schedule(schedule: Sequence[float], predictor: str) -> list[float]:
    values = [float(s) for s in schedule]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"continuation_path: schedule must be finite numbers, got {values}")
    if predictor not in ("tangent", "none"):
        raise ValueError(
            f"continuation_path: predictor must be 'tangent' or 'none', got {predictor!r}"
        )
    return values


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

    Each solve is :func:`~soo_func.drivers.minimize` on ``value_fn(., lam_k)`` started
    from the previous solution moved along the path tangent (a warm start with the Euler
    predictor of Allgower & Georg Algorithm 2.2.3):
    ``x_start = x_{k-1} + (lam_k - lam_{k-1}) dx/dlam``, ``dx/dlam`` from
    :func:`~soo_func.continuation.path_tangent` (the predictor of
    :func:`~soo_func.continuation.homotopy`'s minimizer path). The predicted point is
    kept only when its value is below that of ``x_{k-1}`` (two value evaluations). A point
    counts as solved when ``|grad|_inf <= gtol``. The evaluation counts cover every solve
    and predictor.

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
    values = _checked_schedule(schedule, predictor)
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
