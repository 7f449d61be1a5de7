"""Hessian-free optimization (Martens 2010, "Deep learning via Hessian-free optimization").

Each step approximately minimizes the damped quadratic model of the batch loss

    q(p) = f + g^T p + 0.5 p^T (B + lambda I) p

with conjugate gradients, where ``B`` is a curvature matrix given by its products
(the Gauss-Newton matrix on a subsample, :func:`soo_func.stochastic.training.ggn_operator`, as
Martens recommends; the Hessian of ``value_fn`` by default). The pieces of the paper:

CG is :func:`soo_func.krylov.cg` (a fixed iteration count, stopping at nonpositive curvature),
with Martens' rules as its ``on_iteration`` (:class:`MartensProgress`):

* CG warm-started from the decayed previous solution ``x_0 = decay * p_{k-1}`` (sec. 4.5).
* CG stopped by relative progress on the quadratic (sec. 4.4): after ``i > k``
  iterations with ``k = max(10, 0.1 i)``, stop once ``(phi_i - phi_{i-k}) / phi_i < k * eps``.
* CG backtracking (sec. 4.6): the iterates at ``i = ceil(gamma^j)`` are kept and the one
  with the lowest batch loss is taken (no step at all when none lowers it).
* Levenberg-Marquardt damping (sec. 4.1): with the reduction ratio
  ``rho = (f(w + p) - f(w)) / (q(p) - q(0))`` (undamped ``q``), ``lambda`` grows by
  3/2 when ``rho < 1/4`` and shrinks by 2/3 when ``rho > 3/4``.

Every decision is a tensor mask (``torch.where``): no host synchronisation, a fixed
number of curvature products (``max_cg_iters + 2``: the warm start residual, the CG
iterations, the reduction ratio) and one forward pass of ``value_fn`` per kept
iterate. The output is the step itself (add it to the params with ``apply_updates``).
With ``curvature=hessian_operator(loss_fn, params, subsample(batch, h))`` this is
the subsampled Hessian Newton-CG method of Byrd, Chin, Neveitt and Nocedal (2011).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.krylov import cg
from soo_func.options import check_int_at_least, check_interval, check_positive
from soo_func.oracles import hvp

PyTree = Any

__all__ = ["HessianFreeState", "MartensProgress", "hessian_free"]


class HessianFreeState(NamedTuple):
    """``damping``: the current lambda (0-d); ``previous_solution``: the last CG iterate
    (warm start); ``reduction_ratio``: rho of the last step (0-d); ``cg_iterations``: CG
    iterations run in the last step (0-d int)."""

    damping: torch.Tensor
    previous_solution: PyTree
    reduction_ratio: torch.Tensor
    cg_iterations: torch.Tensor


def _backtrack_schedule(max_cg_iters: int, gamma: float) -> list[int]:
    """Iterations ``ceil(gamma^j)`` up to ``max_cg_iters``, plus the last one (sorted)."""
    kept, j = {max_cg_iters}, 0
    while math.ceil(gamma**j) < max_cg_iters:
        kept.add(math.ceil(gamma**j))
        j += 1
    return sorted(kept)


class MartensProgress:
    """CG's ``on_iteration`` for Martens' (2010) sec. 4.4 stopping rule and sec. 4.6 iterates.

    For ``A x = b`` with ``phi(x) = 0.5 x^T A x - b^T x = -0.5 x^T (r + b)`` (``r = b - A x``),
    stop after iteration ``i`` once ``i > k = max(10, 0.1 i)`` and
    ``(phi_i - phi_{i-k}) / phi_i < k * progress_tol`` (with ``phi_i < 0``); keep the iterates
    of the iterations in ``kept_iterations`` (in ``self.kept``) for CG backtracking.
    """

    def __init__(self, b: PyTree, progress_tol: float, kept_iterations: list[int]) -> None:
        self.b = b
        self.progress_tol = progress_tol
        self.kept_iterations = kept_iterations
        self.phis: list[torch.Tensor] = []
        self.kept: list[PyTree] = []

    def __call__(self, i: int, x: PyTree, r: PyTree) -> torch.Tensor:
        self.phis.append(-0.5 * tree.vdot(x, tree.add(r, self.b)))
        if i in self.kept_iterations:
            self.kept.append(x)
        phi = self.phis[-1]
        window = max(10, int(0.1 * i))
        if i <= window:
            return torch.zeros_like(phi, dtype=torch.bool)
        old = self.phis[-1 - window]
        relative = (phi - old) / torch.where(phi < 0, phi, -1.0)
        return (phi < 0) & (relative < window * self.progress_tol)


def hessian_free(
    damping: float = 1.0,
    max_cg_iters: int = 20,
    progress_tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    backtrack_gamma: float = 1.3,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    min_damping: float = 1e-8,
) -> Transform:
    """Martens' (2010) Hessian-free step with CG backtracking and LM damping.

    Args:
      damping: initial Levenberg-Marquardt lambda.
      max_cg_iters: CG iterations per step (the budget of curvature products).
      progress_tol: ``eps`` of the relative-progress CG stopping rule.
      warm_start_decay: CG starts from ``warm_start_decay * previous solution``.
      backtrack_gamma: CG iterates ``ceil(gamma^j)`` are candidates for backtracking.
      damping_increase, damping_decrease: lambda factors for ``rho < 1/4`` / ``rho > 3/4``.
      min_damping: lambda never drops below this.

    Extras: ``value_fn`` (the batch loss, required), ``value`` and ``grad`` at params,
    ``curvature`` (``v -> B v``, the protocol key that levenberg and trust_region read too;
    Hessian products of ``value_fn`` when absent).
    """
    who = "hessian_free"
    check_positive(who, "damping", damping)
    check_positive(who, "progress_tol", progress_tol)
    check_positive(who, "min_damping", min_damping)
    check_int_at_least(who, "max_cg_iters", max_cg_iters, 1)
    check_interval(who, "warm_start_decay", warm_start_decay, 0, 1, include_low=True,
                   include_high=True)  # fmt: skip
    check_interval(who, "backtrack_gamma", backtrack_gamma, 1, math.inf)
    check_interval(who, "damping_increase", damping_increase, 1, math.inf)
    check_interval(who, "damping_decrease", damping_decrease, 0, 1)
    kept_iterations = _backtrack_schedule(max_cg_iters, backtrack_gamma)

    def init(params: PyTree) -> HessianFreeState:
        first = tree.leaves(params)[0]
        zero = torch.zeros((), dtype=first.dtype, device=first.device)
        return HessianFreeState(
            damping=zero + damping,
            previous_solution=tree.zeros_like(params),
            reduction_ratio=zero,
            cg_iterations=torch.zeros((), dtype=torch.int64, device=first.device),
        )

    def update(updates, state: HessianFreeState, params=None, **extra):
        require_extras("hessian_free", extra, "value_fn")
        if params is None:
            raise TypeError("hessian_free needs params in update(updates, state, params, ...)")
        value_fn = extra["value_fn"]
        grad = extra.get("grad")
        grad = updates if grad is None else grad
        value = extra.get("value")
        if value is None:
            with torch.no_grad():
                value = value_fn(params)
        curvature = extra.get("curvature")
        if curvature is None:

            def curvature(v):
                return hvp(value_fn, params, v)

        lam = state.damping

        def damped(v):
            return tree.axpy(lam, v, curvature(v))

        b = tree.neg(grad)
        progress = MartensProgress(b, progress_tol, kept_iterations)
        solved = cg(
            damped,
            b,
            tree.scale(warm_start_decay, state.previous_solution),
            max_iters=max_cg_iters,
            rtol=0.0,
            check_every=None,  # a fixed number of products, no host read
            stop_on_negative_curvature=True,
            on_iteration=progress,
        )
        solution, candidates, iterations = solved.x, progress.kept, solved.num_iters
        with torch.no_grad():
            values = torch.stack([value_fn(tree.add(params, c)).detach() for c in candidates])
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf))
        best_value, best = values.min(dim=0)  # no tensor-valued index: traceable
        improved = best_value < value
        step = tree.zeros_like(grad)
        for k, candidate in enumerate(candidates):
            step = tree.where(best == k, candidate, step)
        step = tree.where(improved, step, tree.zeros_like(grad))

        model_change = tree.vdot(grad, step) + 0.5 * tree.vdot(step, curvature(step))
        rho = torch.where(
            improved & (model_change < 0),
            (best_value - value) / torch.where(model_change < 0, model_change, -1.0),
            torch.zeros_like(value),
        )
        new_damping = torch.where(
            rho < 0.25, lam * damping_increase, torch.where(rho > 0.75, lam * damping_decrease, lam)
        ).clamp_min(min_damping)
        return step, HessianFreeState(new_damping, solution, rho.detach(), iterations)

    def publish(state: HessianFreeState, params=None, **extra):
        del params, extra
        return {
            "hessian_free_damping": state.damping,
            "hessian_free_reduction_ratio": state.reduction_ratio,
        }

    return guarded(who, Transform(init, update, publish), HessianFreeState)
