"""The driver :func:`least_squares`: :func:`~soo_func.drivers.minimize.minimize` on
``0.5 * ||r(params)||^2`` with a counted ``residual_fn`` passed to the optimizer as an
extra."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree
from soo_func.base import Transform, check_transform
from soo_func.drivers.adjoint import bind_args, check_adjoint
from soo_func.drivers.minimize import MinimizeResult, minimize
from soo_func.oracles import CountedObjective, ShardedFunction, raw_function
from soo_func.searches.levenberg import levenberg_marquardt

PyTree = Any

__all__ = ["least_squares"]


def least_squares(
    residual_fn: Callable[[PyTree], PyTree],
    params: PyTree,
    optimizer: Transform | None = None,
    *,
    args: tuple = (),
    **kwargs: Any,
) -> MinimizeResult:
    """Minimize ``0.5 * ||residual_fn(params)||^2``.

    The optimizer receives ``residual_fn`` as an extra (Gauss-Newton and
    Levenberg-Marquardt use it), wrapped in a :class:`~soo_func.oracles.CountedObjective`
    so that what the optimizer evaluates through it is counted by the same rule as the
    objective: its residual evaluations (direct calls, the outputs of a Gauss-Newton
    operator it builds, the residuals returned with a dense Jacobian) are the result's
    ``num_residual_evals``, and its Gauss-Newton / Jacobian products are added to
    ``num_hvp_evals``. The objective's own values (``0.5 |r|^2``, from the raw
    ``residual_fn``) are ``num_value_evals`` as in :func:`minimize`. When ``optimizer``
    is ``None`` it is ``levenberg_marquardt()``. Other keyword arguments go to
    :func:`minimize` (``state=`` resumes a run; an exception carries
    ``err.partial_result`` with these counts, as there; ``args`` are extra arguments of
    ``residual_fn(params, *args)``, and ``adjoint="implicit"`` differentiates the solution
    with respect to them through ``J^T r = 0``, see :mod:`soo_func.drivers.adjoint`;
    ``adjoint="unrolled"`` through the steps, see :mod:`soo_func.drivers.unrolled`;
    ``check_every=None`` runs the sync-free loop of :mod:`soo_func.drivers.sync_free`, which
    ``torch.func.vmap`` batches: :func:`~soo_func.batched_least_squares`).
    """
    optimizer = levenberg_marquardt() if optimizer is None else optimizer
    check_transform("least_squares", optimizer)
    check_adjoint("least_squares", kwargs.get("adjoint"), args)
    raw = raw_function(residual_fn)
    counted = CountedObjective(bind_args(raw, args, kwargs.get("adjoint")))

    def value_fn(p: PyTree, *a: Any) -> torch.Tensor:
        return 0.5 * tree.sum_of_squares(raw(p, *a))

    if isinstance(raw, ShardedFunction):  # residuals sharded over ranks: soo_func.distributed
        if kwargs.get("adjoint") is not None:
            raise ValueError("least_squares: adjoint is not supported with sharded residuals")
        bound = bind_args(raw, args)  # raw.bind(*detached args) (raw without args)
        counted, value_fn, args = CountedObjective(bound), bound.objective, ()

    extra = dict(kwargs.pop("extra", None) or {}, residual_fn=counted)

    def with_residual_counts(result: MinimizeResult) -> MinimizeResult:
        return dataclasses.replace(
            result,
            num_hvp_evals=result.num_hvp_evals + counted.num_hvp_evals,
            num_residual_evals=counted.num_value_evals,
        )

    try:
        result = minimize(value_fn, params, optimizer, extra=extra, args=args, **kwargs)
    except BaseException as err:
        partial = getattr(err, "partial_result", None)
        if isinstance(partial, MinimizeResult):
            err.partial_result = with_residual_counts(partial)
        raise
    return with_residual_counts(result)
