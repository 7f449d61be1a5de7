"""Batched solves: many independent small problems in one vectorized run.

:func:`batched_minimize` and :func:`batched_least_squares` map the sync-free driver
(``check_every=None``, :mod:`soo_func.drivers.sync_free`) over a leading batch dimension
of the params (several starts) and of the objective's ``args`` (several data sets) with
``torch.func.vmap``. Each problem keeps its own step lengths, damping, acceptance and
convergence: a problem that stops is frozen while the others go on, and nothing couples
the batch. They are the pattern ::

    torch.func.vmap(
        lambda x0, data: sf.least_squares(
            residual_fn, x0, sf.levenberg_marquardt(), args=(data,), max_steps=50,
            check_every=None,
        ).params
    )(x0s, datas)

with the whole result batched. The optimizer must trace under ``vmap`` (no host reads
in its update: ``chain(lbfgs(), armijo_sync_free())``, ``chain(gauss_newton(),
armijo_sync_free())``, ``levenberg_marquardt()``; host-deciding searches such as
``wolfe`` cannot be batched).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optree
import torch

from soo_func.base import Transform
from soo_func.drivers.least_squares import least_squares
from soo_func.drivers.minimize import minimize
from soo_func.drivers.result import MinimizeResult

PyTree = Any

__all__ = ["batched_least_squares", "batched_minimize"]

_BATCHED_FIELDS = ("params", "value", "grad", "grad_norm", "num_steps", "converged", "reason_code")


def _vmapped(
    solve: Callable[..., MinimizeResult],
    params: PyTree,
    args: tuple,
    args_dims: Any,
    chunk_size: int | None,
) -> MinimizeResult:
    """``solve(params_i, args_i)`` for every problem ``i`` of the batch, as one result whose
    tensors have the batch dimension first (the counts are one problem's)."""
    last: dict[str, Any] = {}

    def one(p: PyTree, a: tuple) -> tuple:
        result = solve(p, a)
        state_leaves, state_spec = optree.tree_flatten(result.state, none_is_leaf=True)
        is_tensor = [isinstance(leaf, torch.Tensor) for leaf in state_leaves]
        last.update(result=result, state=(state_leaves, state_spec, is_tensor))
        batched = tuple(getattr(result, name) for name in _BATCHED_FIELDS)
        return batched, [leaf for leaf, t in zip(state_leaves, is_tensor, strict=True) if t]

    vmapped = torch.func.vmap(one, in_dims=(0, args_dims), chunk_size=chunk_size)
    batched, state_tensors = vmapped(params, args)
    leaves, spec, is_tensor = last["state"]
    tensors = iter(state_tensors)
    state = spec.unflatten(
        [next(tensors) if t else leaf for leaf, t in zip(leaves, is_tensor, strict=True)]
    )
    fields = dict(zip(_BATCHED_FIELDS, batched, strict=True))
    return dataclasses.replace(last["result"], state=state, **fields)


def batched_minimize(
    value_fn: Callable[..., torch.Tensor],
    params: PyTree,
    optimizer: Transform,
    *,
    args: tuple = (),
    args_dims: Any = 0,
    max_steps: int = 100,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> MinimizeResult:
    """Minimize a batch of independent problems ``value_fn(params[i], *args[i])``.

    Args:
      value_fn: ``(params, *args) -> 0-d loss`` for one problem.
      params: the starts, every leaf with the batch dimension first (multi-start: the
        same ``args`` for all, ``args_dims=None``).
      optimizer: a :class:`~soo_func.Transform` that traces under ``vmap`` (module
        docstring), e.g. ``chain(lbfgs(), armijo_sync_free())``.
      args: extra arguments of ``value_fn``; their tensors have the batch dimension at
        ``args_dims`` (``torch.func.vmap``'s ``in_dims`` for them: ``0``, ``None`` for
        shared ones, or a tuple with one entry per argument).
      max_steps: the steps every problem runs (a problem that stops earlier is frozen).
      chunk_size: solve this many problems at a time (less memory, ``vmap``'s option).
      kwargs: :func:`~soo_func.minimize`'s stopping options (``gtol``, ``gtol_rel``,
        ``ftol``, ``xtol``, ``extra``).

    Returns one :class:`~soo_func.MinimizeResult` whose ``params``, ``value``, ``grad``,
    ``grad_norm``, ``num_steps``, ``converged``, ``reason_code`` and the tensors of
    ``state`` have the batch dimension first; the evaluation counts are those of one
    problem (every problem runs every step, frozen or not).
    """

    def solve(p: PyTree, a: tuple) -> MinimizeResult:
        return minimize(
            value_fn, p, optimizer, args=a, max_steps=max_steps, check_every=None, **kwargs
        )

    return _vmapped(solve, params, tuple(args), args_dims, chunk_size)


def batched_least_squares(
    residual_fn: Callable[..., PyTree],
    params: PyTree,
    optimizer: Transform | None = None,
    *,
    args: tuple = (),
    args_dims: Any = 0,
    max_steps: int = 100,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> MinimizeResult:
    """Solve a batch of independent least-squares problems
    ``min 0.5 |residual_fn(params[i], *args[i])|^2`` (10,000 small curve fits in one run).

    As :func:`batched_minimize`, with :func:`~soo_func.least_squares` per problem
    (``optimizer`` ``None``: ``levenberg_marquardt()``), so ``num_residual_evals`` is
    filled too. Example, ``y = a exp(-b t) + c`` fitted to each row of ``ys``::

        def residual(p, y):
            return p[0] * torch.exp(-p[1] * t) + p[2] - y

        result = sf.batched_least_squares(residual, x0s, args=(ys,), max_steps=50)
        result.params  # (batch, 3)
    """

    def solve(p: PyTree, a: tuple) -> MinimizeResult:
        return least_squares(
            residual_fn, p, optimizer, args=a, max_steps=max_steps, check_every=None, **kwargs
        )

    return _vmapped(solve, params, tuple(args), args_dims, chunk_size)
