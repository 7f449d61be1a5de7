"""Generalized Gauss-Newton directions, matrix-free: ``gauss_newton``.

The direction solves ``(G + damping I) d = -g`` by conjugate gradients, where ``G`` is

* ``J^T J`` for least squares ``0.5 ||r(params)||^2`` (``J`` the Jacobian of the
  ``residual_fn`` extra; Nocedal & Wright section 10.3, eq. 10.23), or
* ``J^T H_L J`` for a loss on model outputs, ``loss_fn(model_fn(params))``, with
  ``H_L`` the Hessian of ``loss_fn`` at the outputs (Schraudolph 2002; Martens 2010,
  the Hessian-free setting). ``G`` is positive semi-definite whenever ``loss_fn`` is
  convex in the outputs (squared error, softmax cross-entropy), so CG applies.

Products come from :func:`soo_func.oracles.ggn_operator`: one forward of the model per
update (its saved ``vjp``), then per CG iteration ``J v`` as the vjp of ``u -> J^T u``, one
loss Hessian product and one ``vjp``: two reverse passes, no forward. Counting follows :class:`soo_func.oracles.CountedObjective`: a counted
``residual_fn`` (as :func:`soo_func.least_squares` passes it) or a counted ``model_fn``
is charged one evaluation per linearization and one product per CG iteration. No host
sync in ``update`` unless ``check_every`` asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import krylov, oracles, tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.options import check_int_at_least, check_interval, check_nonnegative

PyTree = Any

__all__ = ["GaussNewtonState", "gauss_newton"]


class GaussNewtonState(NamedTuple):
    """State of :func:`gauss_newton`: products made so far, the last solve's iterations,
    its relative residual ``||(G + damping I) d + g|| / ||g||``, whether the direction
    fell back to ``-g``, and the number of updates."""

    num_products: torch.Tensor
    krylov_iters: torch.Tensor
    relative_residual: torch.Tensor
    fallback: torch.Tensor
    count: torch.Tensor


def gauss_newton(
    model_fn: Callable[[PyTree], PyTree] | None = None,
    loss_fn: Callable[[PyTree], torch.Tensor] | None = None,
    *,
    damping: float = 0.0,
    rtol: float = 1e-6,
    max_iters: int | None = None,
    check_every: int | None = None,
) -> Transform:
    """The Gauss-Newton direction ``d ~ -(G + damping I)^{-1} g`` from a CG solve.

    Args:
      model_fn: ``params -> outputs`` (a tensor or pytree; bind data with a closure).
        When ``None`` the ``residual_fn`` extra is used and ``G = J^T J``.
      loss_fn: ``outputs -> 0-d loss``, convex in the outputs; the objective must be
        ``value_fn(params) = loss_fn(model_fn(params))`` (its gradient is the ``grad``
        extra). ``None`` with a ``model_fn`` means ``0.5 ||outputs||^2``.
      damping: ``lambda >= 0`` (Levenberg-Marquardt / Tikhonov damping; Martens 2010).
      rtol: relative tolerance of the CG solve, ``||(G + lambda I) d + g|| <= rtol ||g||``.
      max_iters: the most CG iterations per update (default ``min(2 n, 100)``).
      check_every: ``None`` (default) never syncs (runs ``max_iters`` iterations,
        frozen once converged); an int ``k`` checks convergence on the host every
        ``k`` iterations and stops early.

    A direction that is not a descent direction (zero curvature with ``damping = 0``, or
    rounding) falls back to ``-g``. Publishes ``curvature`` (``v -> (G + lambda I) v`` at
    ``params``, built lazily: one linearization on its first call) and the diagnostics
    ``gauss_newton_krylov_iters`` and ``gauss_newton_fallback``.
    """
    if loss_fn is not None and model_fn is None:
        raise ValueError(
            "gauss_newton: loss_fn needs model_fn (the objective is loss_fn(model_fn(params)))"
        )
    check_nonnegative("gauss_newton", "damping", damping)
    check_interval("gauss_newton", "rtol", rtol, 0, 1)
    if max_iters is not None:
        check_int_at_least("gauss_newton", "max_iters", max_iters, 1)
    if check_every is not None:
        check_int_at_least("gauss_newton", "check_every", check_every, 1)

    def operator(params: PyTree, extra: dict) -> Callable[[PyTree], PyTree]:
        if model_fn is None:
            require_extras("gauss_newton (without model_fn)", extra, "residual_fn")
            return oracles.ggn_operator(extra["residual_fn"], params, damping=damping)[1]
        return oracles.ggn_operator(model_fn, params, loss_fn, damping=damping)[1]

    def init(params: PyTree) -> GaussNewtonState:
        ref = tree.leaves(params)[0]
        count = torch.zeros((), dtype=torch.int64, device=ref.device)
        false = torch.zeros((), dtype=torch.bool, device=ref.device)
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return GaussNewtonState(count, count, zero, false, count)

    def update(updates: PyTree, state: GaussNewtonState, params: PyTree = None, **extra: Any):
        if params is None:
            raise TypeError("gauss_newton needs params in update(updates, state, params, ...)")
        grad = extra.get("grad")
        grad = updates if grad is None else grad
        matvec = operator(params, extra)
        n = sum(leaf.numel() for leaf in tree.leaves(grad))
        iters = min(2 * n, 100) if max_iters is None else max_iters
        result = krylov.cg(
            matvec, tree.neg(grad), rtol=rtol, max_iters=iters, check_every=check_every,
            stop_on_negative_curvature=True,
        )  # fmt: skip
        fallback = ~(tree.vdot(grad, result.x) < 0)
        direction = tree.where(fallback, tree.neg(grad), result.x)
        grad_norm = tree.norm(grad)
        new_state = GaussNewtonState(
            num_products=state.num_products + result.num_matvecs,
            krylov_iters=result.num_iters,
            relative_residual=result.residual_norm
            / torch.clamp(grad_norm, min=torch.finfo(grad_norm.dtype).tiny),
            fallback=fallback,
            count=state.count + 1,
        )
        return direction, new_state

    def publish(state: GaussNewtonState, params: PyTree = None, **extra: Any) -> dict:
        out = {
            "gauss_newton_krylov_iters": state.krylov_iters,
            "gauss_newton_fallback": state.fallback,
        }
        if params is not None and (model_fn is not None or extra.get("residual_fn") is not None):
            cache: list = []

            def curvature(v: PyTree) -> PyTree:
                if not cache:
                    cache.append(operator(params, extra))
                return cache[0](v)

            out["curvature"] = curvature
        return out

    return guarded("gauss_newton", Transform(init, update, publish), GaussNewtonState)
