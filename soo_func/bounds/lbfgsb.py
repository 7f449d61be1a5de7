"""L-BFGS-B: limited-memory BFGS on a box, :func:`lbfgs_b` (Byrd, Lu, Nocedal & Zhu 1995).

Each update, at a feasible ``x`` with gradient ``g``:

1. the pair ``(s, y)`` of the last step joins the memory when ``s^T y > eps |y|^2``
   (BLNZ eq. 3.9; :mod:`soo_func.directions.pair_memory`), and ``B = sigma I + V F V^T``
   is the compact BFGS matrix with ``sigma = y^T y / s^T y`` of the newest pair
   (:func:`soo_func.directions.compact.bfgs_direct_kernel`);
2. the generalized Cauchy point and the subspace minimization give a feasible target
   ``x_bar`` (:mod:`soo_func.bounds.cauchy`), and ``d = x_bar - x``;
3. a strong Wolfe search on ``phi(alpha) = f(x + alpha d)`` over the feasible part of the
   ray (:mod:`soo_func.bounds.search`), from ``alpha = 1`` (the first update, with no pair
   yet, from ``min(1, 1 / ||d||)`` as L-BFGS-B does).

The transform is a whole optimizer (direction and search), used alone:
``sf.minimize(f, x0, sf.lbfgs_b(lower=0.0))``. It publishes ``next_value`` / ``next_grad``
(the accepted point's, reused by the driver), ``search_failed``, ``num_active_bounds`` and
``projected_grad_inf``, the stationarity measure ``||P(x - g) - x||_inf`` that the driver's
``gtol`` tests instead of ``||g||_inf`` (a minimizer on a bound has a non-zero gradient).
Every point it hands on lies in the box exactly: the step is trimmed so that the driver's
``params + updates`` rounds into the box. The search decides on the host (eager).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.bounds.box import bounded_publish, flat_box, projected_gradient_norm
from soo_func.bounds.cauchy import generalized_cauchy_point, subspace_minimizer
from soo_func.bounds.search import box_wolfe_search, max_feasible_step
from soo_func.checks import BOUNDED_INSTEAD, refuse_vmap
from soo_func.directions import pair_memory as pm
from soo_func.directions.compact import bfgs_direct_kernel, newest_gamma
from soo_func.options import check_int_at_least, check_interval

PyTree = Any

__all__ = ["LbfgsbState", "lbfgs_b"]


class LbfgsbState(NamedTuple):
    """The state of :func:`lbfgs_b`: the pair memory, the last point, and what the last
    update found (the accepted point's value and gradient, the search outcome)."""

    memory: pm.PairMemory
    last: pm.LastPoint
    count: torch.Tensor
    search_failed: torch.Tensor
    num_active_bounds: torch.Tensor
    projected_grad_inf: torch.Tensor
    next_value: torch.Tensor
    next_grad: PyTree


def _accept_rule(eps: float):
    def rule(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        m = valid.shape[0]
        sy, yy = gram[m - 1, 2 * m - 1], gram[2 * m - 1, 2 * m - 1]
        return (sy > eps * yy) & torch.isfinite(sy)

    return rule


def lbfgs_b(
    lower: Any = None,
    upper: Any = None,
    *,
    memory_size: int = 10,
    c1: float = 1e-3,
    c2: float = 0.9,
    max_evals: int = 20,
) -> Transform:
    """L-BFGS-B (see the module docstring): minimize ``f`` subject to ``lower <= x <= upper``.

    Args:
      lower, upper: ``None``, a number, or a pytree like the params of tensors that
        broadcast to its leaves; ``-inf`` / ``+inf`` entries are absent bounds.
      memory_size: the number of curvature pairs kept (``m``; scipy's ``maxcor``, 10).
      c1, c2: the constants of the strong Wolfe search (:mod:`soo_func.bounds.search`;
        L-BFGS-B's 1e-3 and 0.9).
      max_evals: the most trial points per update; a search that finds no decrease
        publishes ``search_failed`` with a zero step.

    The params must be feasible at the first update (``sf.project_to_bounds`` gives a
    feasible start); an infeasible point raises.
    """
    check_int_at_least("lbfgs_b", "memory_size", memory_size, 1)
    check_interval("lbfgs_b", "c1", c1, 0, 1)
    check_interval("lbfgs_b", "c2", c2, c1, 1)
    check_int_at_least("lbfgs_b", "max_evals", max_evals, 1)

    def init(params: PyTree) -> LbfgsbState:
        flat_box(lower, upper, params)  # bounds that do not fit the params raise here
        x = tree.ravel(params).flat
        n, zero = x.numel(), x.new_zeros(())
        memory = pm.init_memory(memory_size, n, x.dtype, x.device)
        last = pm.init_last_point(memory_size, n, x.dtype, x.device)
        count = torch.zeros((), dtype=torch.int64, device=x.device)
        false = torch.zeros((), dtype=torch.bool, device=x.device)
        inf = torch.full_like(zero, math.inf)
        grad0 = tree.zeros_like(params)
        return LbfgsbState(memory, last, count, false, count, inf, inf, grad0)

    def model_target(x, g, box, memory) -> torch.Tensor:
        gram, valid = memory.gram, memory.valid
        sigma = 1.0 / newest_gamma(gram, valid)
        kernel = bfgs_direct_kernel(gram, valid, sigma)
        pairs = pm.stacked_pairs(memory)
        columns = torch.cat([pairs[:, 0], pairs[:, 1]]).to(kernel.dtype)  # [2m, n]
        both = torch.cat([valid, valid])
        columns = torch.where(both[:, None], columns, 0.0)
        cauchy = generalized_cauchy_point(x, g, box, sigma, columns, kernel)
        return subspace_minimizer(x, g, box, sigma, columns, kernel, cauchy).to(x.dtype)

    def first_steps(x, d, box, first: bool) -> tuple[float, float]:
        """``(alpha_0, alpha_max)`` as L-BFGS-B sets them: on the first update (no pair)
        ``alpha_max = 1`` with bounds, and ``alpha_0 = 1`` when every entry has both bounds,
        else ``min(1 / ||d||, alpha_max)``; later ``alpha_0 = 1`` and ``alpha_max`` the
        longest feasible step along ``d``."""
        longest = max_feasible_step(x, d, box)
        if not first:
            return min(1.0, longest), longest
        bounded = bool((torch.isfinite(box.lower) | torch.isfinite(box.upper)).any())
        boxed = bool((torch.isfinite(box.lower) & torch.isfinite(box.upper)).all())
        alpha_max = min(1.0, longest) if bounded else longest
        norm = float(torch.linalg.vector_norm(d))
        alpha_0 = alpha_max if boxed or norm == 0 else min(1.0 / norm, alpha_max)
        return alpha_0, alpha_max

    def search_along(value_fn, params, value, x, g, box, memory):
        """The accepted trial along the model's direction, or ``None``."""
        d = model_target(x, g, box, memory) - x
        slope = float(torch.dot(g, d))
        if not slope < 0:
            return None
        alpha_0, alpha_max = first_steps(x, d, box, not bool(memory.valid.any()))
        start = (float(value), slope, alpha_0, alpha_max)
        return box_wolfe_search(value_fn, params, d, box, start, (c1, c2, max_evals))

    def update(updates: PyTree, state: LbfgsbState, params: PyTree = None, **extra: Any):
        require_extras("lbfgs_b", extra, "value_fn")
        refuse_vmap("lbfgs_b", "its projected search's trial values", BOUNDED_INSTEAD)
        if params is None:
            raise TypeError("lbfgs_b needs params in update(updates, state, params, ...)")
        value_fn = extra["value_fn"]
        grad = extra.get("grad", updates)
        value = extra.get("value")
        value = value_fn(params) if value is None else value
        box = flat_box(lower, upper, params)
        point = pm.flat_point(params, grad)
        x, g = point[0], point[1]
        if not bool((box.project(x) == x).all()):
            raise ValueError(
                "lbfgs_b: the params lie outside the bounds; start from a feasible point, "
                "e.g. sf.project_to_bounds(params, lower, upper)"
            )
        eps = torch.finfo(x.dtype).eps
        pushed = pm.push(state.memory, state.last, point, _accept_rule(eps))
        memory = pushed.memory
        found = search_along(value_fn, params, value, x, g, box, memory)
        if found is None and bool(memory.valid.any()):
            # L-BFGS-B's recovery: drop the pairs and search again along the model with
            # B = I (a projected steepest-descent step).
            memory = memory._replace(valid=torch.zeros_like(memory.valid),
                                     gram=torch.zeros_like(memory.gram))  # fmt: skip
            found = search_along(value_fn, params, value, x, g, box, memory)
        if found is None:
            delta, next_value, next_grad = torch.zeros_like(x), value, grad
        else:
            delta, next_value, next_grad = found.delta, found.value, found.grad
        new_x = x + delta
        new_g = tree.ravel(next_grad).flat
        at_bound = (new_x <= box.lower) | (new_x >= box.upper)
        new_state = LbfgsbState(
            memory=memory,
            last=pushed.last,
            count=state.count + 1,
            search_failed=torch.tensor(found is None, device=x.device),
            num_active_bounds=at_bound.sum(),
            projected_grad_inf=projected_gradient_norm(new_x, new_g, box),
            next_value=next_value,
            next_grad=next_grad,
        )
        return tree.unravel(delta, params), new_state

    def publish(state: LbfgsbState, params: PyTree = None, **extra: Any) -> dict[str, Any]:
        return bounded_publish(state, extra.get("value_fn"))

    return guarded("lbfgs_b", Transform(init, update, publish), LbfgsbState)
