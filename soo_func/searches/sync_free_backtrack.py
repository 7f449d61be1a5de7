"""The compiled backtracking of :func:`~soo_func.searches.armijo.armijo_sync_free`: the
Armijo trials (Nocedal & Wright, Algorithm 3.1, condition (3.4)) as nested ``torch.cond``,
so that a trial is evaluated only when every earlier one was rejected.

Under ``torch.compile`` a step whose first trial is accepted costs one ``value_and_grad``;
a later accepted trial costs its values and one more ``value_and_grad``. The accepted
step, value and gradient are those of the eager all-trials path (the same trial lengths,
eq. (3.57), and the same acceptance test).

One buffer: when the params, the direction and the gradient share one dtype and device,
the search works on flat vectors (those the direction published as ``flat_step``, or
its own raveling of each): a trial point is one ``x + alpha d``, the objective is called
on ``unravel(x + alpha d)`` (views), and its gradient is one flat tensor, unraveled
(views) once outside the branches. The ``torch.cond`` branches then read three tensors
and return one gradient whatever the number of leaves (a pytree of many tensors otherwise
makes every branch, and the compiled code, grow with the leaves). Mixed dtypes keep the
leafwise path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.oracles import raw_function, value_and_grad

PyTree = Any

__all__ = ["Found", "compiled_search", "compiles_control_flow", "next_trial"]


class Found(NamedTuple):
    """What a search returns (all tensors: the outputs of ``torch.cond``)."""

    alpha: torch.Tensor  # the accepted step length (0 when none)
    value: torch.Tensor  # the value at params + alpha d (f0 when none)
    grad: PyTree  # its gradient (the start's when none)
    found: torch.Tensor
    num_evals: torch.Tensor
    num_grads: torch.Tensor


def next_trial(
    f: torch.Tensor, alpha: torch.Tensor, f0: torch.Tensor, slope: torch.Tensor,
    min_shrink: float, max_shrink: float,
) -> torch.Tensor:  # fmt: skip
    """The next trial after a rejected ``alpha`` with value ``f``: the quadratic's minimiser
    (N&W eq. (3.57)) in ``[min_shrink alpha, max_shrink alpha]`` (``max_shrink alpha`` when
    the quadratic has none), ``min_shrink alpha`` after a non-finite value."""
    finite = torch.isfinite(f)
    curvature = (f - f0 - slope * alpha) / (alpha * alpha)
    candidate = -slope / (2.0 * curvature)
    usable = finite & torch.isfinite(candidate) & (curvature > 0)
    candidate = torch.where(usable, candidate, max_shrink * alpha)
    candidate = torch.minimum(torch.maximum(candidate, min_shrink * alpha), max_shrink * alpha)
    return torch.where(finite, candidate, min_shrink * alpha)


def compiles_control_flow() -> bool:
    """Whether the sync-free searches may branch with ``torch.cond`` here: while
    ``torch.compile`` traces, outside ``torch.func`` transforms (a batched predicate runs
    both branches, so ``vmap`` keeps the all-trials ``torch.where`` path). Eager code keeps
    that path too (an eager ``torch.cond`` would read its predicate on the host)."""
    return torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()


def _one_buffer(*trees: PyTree) -> bool:
    """Whether the leaves of ``trees`` are tensors of one dtype and one device (so they
    ravel into one vector each)."""
    leaves = [leaf for t in trees for leaf in tree.leaves(t)]
    return (
        bool(leaves)
        and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
        and len({(leaf.dtype, leaf.device) for leaf in leaves}) == 1
    )


def compiled_search(
    value_fn: Any, params: PyTree, updates: PyTree, grad: PyTree, f0: torch.Tensor,
    slope: torch.Tensor, alpha0: torch.Tensor, ok_start: torch.Tensor, options: tuple,
    flat: tree.FlatStep | None = None,
) -> tuple[Found, PyTree]:  # fmt: skip
    """The nested-``torch.cond`` search (module docstring) and its step
    ``alpha d`` (zero when nothing was accepted), both shaped like ``params``.

    ``flat``: the raveled ``params``, ``grad`` and ``updates`` when the direction
    published them (no copy is made here then).
    ``value_fn`` is called unwrapped inside the branches (no host counter can be charged
    there): ``num_evals``/``num_grads`` carry the count, published as ``uncharged_evals``."""
    raw = raw_function(value_fn)
    if flat is not None or _one_buffer(params, updates, grad):
        if flat is None:
            x, d, g = (tree.ravel(t).flat for t in (params, updates, grad))
        else:
            x, d, g = flat.x, flat.d, flat.g

        def unpack(vector: torch.Tensor) -> PyTree:
            return tree.unravel(vector, params)

        def objective(vector: torch.Tensor) -> torch.Tensor:
            return raw(unpack(vector))

    else:
        # The branches read these; leaves that are views of one buffer (a raveled
        # direction) would be aliased inputs, which torch.cond refuses: one copy each.
        x, d, g = (tree.map_leaves(torch.clone, t) for t in (params, updates, grad))
        objective = raw

        def unpack(leafwise: PyTree) -> PyTree:
            return leafwise

    found = _branches(objective, x, d, g, (f0, slope, alpha0, ok_start), options)
    step = tree.where(found.found, tree.scale(found.alpha, d), tree.zeros_like(d))
    return found._replace(grad=unpack(found.grad)), unpack(step)


def _branches(
    objective: Callable, x: PyTree, d: PyTree, g: PyTree, start: tuple, options: tuple
) -> Found:
    """The nested ``torch.cond`` on the points ``x + alpha d``; ``start`` is
    ``(f0, slope, alpha0, ok_start)``."""
    f0, slope, alpha0, ok_start = start
    *factors, max_steps = options
    # 0-d tensors: torch.compile(dynamic=True) traces float options as symbolic floats,
    # which torch.cond cannot take into a branch (the same values in the params' dtype).
    slope_rtol, min_shrink, max_shrink = (torch.full_like(f0, factor) for factor in factors)

    # Every tensor a branch returns is made inside it (a branch may not return its inputs).
    def zero() -> torch.Tensor:
        return torch.zeros_like(f0)

    def true() -> torch.Tensor:
        return torch.ones((), dtype=torch.bool, device=f0.device)

    def count(k: int) -> torch.Tensor:
        return torch.full((), k, dtype=torch.int64, device=f0.device)

    def point(alpha: torch.Tensor) -> PyTree:
        return tree.add(x, tree.scale(alpha, d))

    def sufficient(f: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(f) & (f <= f0 + slope_rtol * alpha * slope)

    def none_found(num_evals: torch.Tensor, num_grads: int) -> Found:
        found = Found(zero(), f0, g, ~true(), num_evals, count(num_grads))
        return tree.map_leaves(torch.clone, found)

    def evaluated(alpha: torch.Tensor, num_evals: torch.Tensor, num_grads: int) -> Found:
        value, grad = value_and_grad(objective)(point(alpha))
        # cloned: gradient leaves may be views of one buffer (outputs may not alias either)
        found = Found(alpha, value.detach().reshape(()), grad, true(), num_evals, count(num_grads))
        return tree.map_leaves(torch.clone, found)

    def trial(k: int, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trials ``k..max_steps`` by value: ``(accepted alpha, found, values evaluated)``."""
        with torch.no_grad():
            f = objective(point(alpha)).detach().reshape(())
        good = sufficient(f, alpha)
        if k == max_steps:
            return torch.where(good, alpha, zero()), good.clone(), count(k - 1)
        following = next_trial(f, alpha, f0, slope, min_shrink, max_shrink)
        return torch.cond(
            good, lambda: (alpha.clone(), true(), count(k - 1)), lambda: trial(k + 1, following), ()
        )

    def search() -> Found:
        first = evaluated(alpha0, count(1), 1)
        good = sufficient(first.value, alpha0)

        def backtrack() -> Found:
            if max_steps == 1:
                return none_found(count(1), 1)
            alpha, found, num_values = trial(2, next_trial(
                first.value, alpha0, f0, slope, min_shrink, max_shrink))  # fmt: skip
            evals = num_values + 1
            return torch.cond(
                found, lambda: evaluated(alpha, evals + 1, 2), lambda: none_found(evals, 1), ()
            )

        return torch.cond(good, lambda: tree.map_leaves(torch.clone, first), backtrack, ())

    return torch.cond(ok_start, search, lambda: none_found(count(0), 0), ())
