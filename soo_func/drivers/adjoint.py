"""Solutions that autograd differentiates: the drivers' ``args`` and ``adjoint`` options.

``minimize(value_fn, params, optimizer, args=(theta,), adjoint="implicit")`` solves
``min_x value_fn(x, *args)`` with the ``args`` detached (the solve itself builds no graph),
then attaches the solution to autograd through its optimality condition
``grad_x value_fn(x*, *args) = 0`` (:func:`soo_func.implicit.minimizer`): ``result.params``
and ``result.value`` are differentiable with respect to every tensor of ``args`` that
requires grad, at the memory of one adjoint solve per backward (the Hessian formed from
batched Hessian-vector products and factorized up to ``dense_max_params`` unknowns, CG on
Hessian-vector products beyond), whatever the number of steps (``adjoint="unrolled"``,
which differentiates through the steps instead, is :mod:`soo_func.drivers.unrolled`). For
least squares the condition is ``J^T r = 0`` and the adjoint system
uses the exact Hessian of ``0.5 |r|^2`` (``J^T J`` plus the residuals' curvature; the
Gauss-Newton matrix alone is exact only at zero residual).

A solution that did not converge (``max_steps``, a failed search) is not a root: its
backward raises instead of returning the gradient of the wrong point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import optree
import torch

from soo_func import implicit, tree
from soo_func.oracles import ShardedFunction

PyTree = Any

__all__ = ["ADJOINTS", "bind_args", "check_adjoint", "with_adjoint"]

ADJOINTS = (None, "implicit", "unrolled")


def check_adjoint(who: str, adjoint: str | None, args: tuple) -> None:
    """Refuse an unknown ``adjoint`` and an ``args`` that is not a tuple."""
    if adjoint not in ADJOINTS:
        raise ValueError(
            f"{who}: adjoint must be None (a detached result), 'implicit' or 'unrolled', "
            f"got {adjoint!r}"
        )
    if not isinstance(args, tuple):
        raise TypeError(
            f"{who}: args must be a tuple of extra arguments of the objective, got "
            f"{type(args).__name__}; write args=(theta,) for one"
        )


def _detached(args: tuple) -> tuple:
    return optree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, args)


def bind_args(
    fn: Callable[..., Any], args: tuple, adjoint: str | None = None
) -> Callable[[PyTree], Any]:
    """``p -> fn(p, *args)`` (``fn`` itself when there are none), with ``args`` detached
    unless ``adjoint="unrolled"`` (whose steps autograd records)."""
    if not args:
        return fn
    fixed = args if adjoint == "unrolled" else _detached(args)
    if isinstance(fn, ShardedFunction):  # keeps reducing across the ranks
        return fn.bind(*fixed)
    return lambda p: fn(p, *fixed)


def with_adjoint(
    result: Any, value_fn: Callable[..., torch.Tensor], args: tuple, adjoint: str | None
) -> Any:
    """``result`` with ``params`` and ``value`` attached to autograd (``adjoint="implicit"``).

    The backward accepts the solution as a root when ``|grad|_inf`` there is at most twice
    the driver's own measure of it (rounding of a recomputed gradient); a result that did
    not converge gets no slack, so its backward raises.
    """
    if adjoint != "implicit":
        return result
    measured = float(tree.norm(result.grad, math.inf))
    tol = 2 * measured + 1e-300 if result.converged else 1e-300
    params = implicit.minimizer(value_fn, result.params, args, tol=tol)
    return dataclasses.replace(result, params=params, value=value_fn(params, *args))
