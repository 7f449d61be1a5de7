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

The host loop of :mod:`soo_func.drivers.batched_loop` runs the vmapped steps
``compact_every`` at a time and drops the problems that have stopped from the batch
between rounds (one host read a round): the results are those of the pattern above, at
the cost of the problems still running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree
from soo_func.base import Transform, check_transform
from soo_func.drivers.adjoint import bind_args
from soo_func.drivers.batched_loop import BatchedProblem, solve_batched
from soo_func.drivers.result import MinimizeResult
from soo_func.options import check_int_at_least
from soo_func.oracles import CountedObjective, raw_function
from soo_func.searches.levenberg import levenberg_marquardt

PyTree = Any

__all__ = ["COMPACT_EVERY", "CPU_CHUNK_SIZE", "batched_least_squares", "batched_minimize"]

COMPACT_EVERY = 1
"""The default ``compact_every`` of the batched solves: steps between two compactions."""

CPU_CHUNK_SIZE = 16384
"""``chunk_size="auto"`` on the CPU: problems solved at a time (their tensors stay in cache)."""

_TOLS = {"gtol": 1e-5, "gtol_rel": 0.0, "ftol": 0.0, "xtol": 0.0}


def _solve(
    who: str, bind: Callable, params: PyTree, optimizer: Transform, options: dict[str, Any]
) -> MinimizeResult:
    """Check the options and run :func:`~soo_func.drivers.batched_loop.solve_batched`."""
    check_transform(who, optimizer)
    unknown = set(options["kwargs"]) - set(_TOLS)
    if unknown:
        raise TypeError(f"{who}: unexpected keyword argument(s) {sorted(unknown)}")
    compact_every = options["compact_every"]
    if compact_every is not None:
        check_int_at_least(who, "compact_every", compact_every, 1)
    tols = tuple(options["kwargs"].get(name, default) for name, default in _TOLS.items())
    problem = BatchedProblem(bind, optimizer, tuple(options["args"]), options["args_dims"], tols)
    params = tree.map_leaves(torch.Tensor.detach, params)
    chunk_size = options["chunk_size"]
    if chunk_size == "auto":
        on_cpu = tree.leaves(params)[0].device.type == "cpu"
        chunk_size = CPU_CHUNK_SIZE if on_cpu else None
    return solve_batched(problem, params, options["max_steps"], compact_every, chunk_size)


def batched_minimize(
    value_fn: Callable[..., torch.Tensor],
    params: PyTree,
    optimizer: Transform,
    *,
    args: tuple = (),
    args_dims: Any = 0,
    max_steps: int = 100,
    compact_every: int | None = COMPACT_EVERY,
    chunk_size: int | str | None = "auto",
    extra: dict[str, Any] | None = None,
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
        ``args_dims`` (``torch.func.vmap``'s ``in_dims`` for them: an int, ``None`` for
        shared ones, or a tuple with one int or ``None`` per argument).
      max_steps: the most steps a problem runs (a problem that stops earlier is frozen).
      compact_every: steps between two compactions: the loop reads which problems have
        stopped (one host read), goes on with the others only (when at most
        ``COMPACT_BELOW`` of them run), and ends when all have stopped
        (:mod:`soo_func.drivers.batched_loop`). ``None``: every problem runs all
        ``max_steps`` steps in one vmapped run with no host read.
      chunk_size: solve this many problems at a time (``vmap``'s option: less memory, and
        on the CPU tensors that stay in cache); ``"auto"``: ``CPU_CHUNK_SIZE`` on the CPU,
        the whole batch (``None``) on other devices.
      extra: more keyword extras for the optimizer's ``update``.
      kwargs: :func:`~soo_func.minimize`'s stopping options ``gtol``, ``gtol_rel``,
        ``ftol``, ``xtol``.

    Returns one :class:`~soo_func.MinimizeResult` whose ``params``, ``value``, ``grad``,
    ``grad_norm``, ``num_steps``, ``converged``, ``reason_code`` and the tensors of
    ``state`` have the batch dimension first; each problem's are those of its own
    sync-free solve (``minimize(..., check_every=None)``). The evaluation counts are those
    of one problem that ran every step the loop ran. An exception from ``value_fn`` (or
    ``KeyboardInterrupt``) propagates with ``err.partial_result``, the batch after the last
    completed round (reason ``"interrupted: <ExcType>"``).
    """

    def bind(a: tuple) -> tuple[CountedObjective, dict[str, Any]]:
        return CountedObjective(bind_args(value_fn, a)), dict(extra or {})

    options = dict(args=args, args_dims=args_dims, max_steps=max_steps, kwargs=kwargs)
    options.update(compact_every=compact_every, chunk_size=chunk_size)
    return _solve("batched_minimize", bind, params, optimizer, options)


def batched_least_squares(
    residual_fn: Callable[..., PyTree],
    params: PyTree,
    optimizer: Transform | None = None,
    *,
    args: tuple = (),
    args_dims: Any = 0,
    max_steps: int = 100,
    compact_every: int | None = COMPACT_EVERY,
    chunk_size: int | str | None = "auto",
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MinimizeResult:
    """Solve a batch of independent least-squares problems
    ``min 0.5 |residual_fn(params[i], *args[i])|^2`` (10,000 small curve fits in one run).

    As :func:`batched_minimize` (``compact_every`` included), with
    :func:`~soo_func.least_squares` per problem (``optimizer`` ``None``:
    ``levenberg_marquardt()``; the optimizer gets the counted ``residual_fn`` extra), so
    ``num_residual_evals`` is filled too. Example, ``y = a exp(-b t) + c`` fitted to each
    row of ``ys``::

        def residual(p, y):
            return p[0] * torch.exp(-p[1] * t) + p[2] - y

        result = sf.batched_least_squares(residual, x0s, args=(ys,), max_steps=50)
        result.params  # (batch, 3)
    """
    optimizer = levenberg_marquardt() if optimizer is None else optimizer
    raw = raw_function(residual_fn)

    def value_fn(p: PyTree, *a: Any) -> torch.Tensor:
        return 0.5 * tree.sum_of_squares(raw(p, *a))

    def bind(a: tuple) -> tuple[CountedObjective, dict[str, Any]]:
        residuals = CountedObjective(bind_args(raw, a))
        objective = CountedObjective(bind_args(value_fn, a))
        return objective, dict(extra or {}, residual_fn=residuals)

    options = dict(args=args, args_dims=args_dims, max_steps=max_steps, kwargs=kwargs)
    options.update(compact_every=compact_every, chunk_size=chunk_size)
    return _solve("batched_least_squares", bind, params, optimizer, options)
