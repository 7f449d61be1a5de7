"""Matrix-free (truncated, inexact) Newton: ``newton_krylov``.

The direction solves ``(H + damping I) d = -g`` with a Krylov method whose products
``H v`` come from ``torch.func`` (:mod:`soo_func.oracles`), to the relative tolerance
``||(H + damping I) d + g|| <= eta_k ||g||`` of a forcing term ``eta_k``
(inexact Newton: Dembo, Eisenstat & Steihaug 1982; Nocedal & Wright section 7.1):

* ``"eisenstat_walker_1"``: ``eta_k = | ||g_k|| - ||g_{k-1} + B_{k-1} d_{k-1}|| | / ||g_{k-1}||``,
  safeguarded by ``max(eta_k, eta_{k-1}^phi)`` when ``eta_{k-1}^phi > 0.1``,
  ``phi = (1 + sqrt 5) / 2`` (Eisenstat & Walker 1996, Choice 1);
* ``"eisenstat_walker_2"``: ``eta_k = gamma (||g_k|| / ||g_{k-1}||)^alpha``,
  safeguarded by ``max(eta_k, gamma eta_{k-1}^alpha)`` when that exceeds 0.1 (Choice 2,
  ``gamma = 0.9``, ``alpha = 2``);
* ``"nocedal_wright"``: ``eta_k = min(0.5, sqrt(||g_k||))`` (N&W eq. (7.3), superlinear);
* a number: a constant ``eta``.

All are capped at ``eta_max`` (and ``eta_0 = eta_initial`` for the two EW choices).

Negative curvature: CG and CR stop on a direction ``p`` with ``p^T B p <= 0`` and return
the iterate reached before it (N&W Algorithm 7.1, Newton-CG; Dahito & Orban 2019 for
CR). When no step was taken (negative curvature at the first iteration), or whenever the
result is not a descent direction (``<g, d> >= 0``, possible with MINRES), the direction
falls back to ``-(|g|^2 / |g^T B g|) g`` (N&W use ``-g``; the scaling, as in scipy's
Newton-CG, lets a unit first trial step be reasonable; it costs one product, made only
when the fallback is taken, or on every update with ``check_every=None``, where no host
read decides it).

Host reads: by default (``check_every=1``) the solve reads its convergence test on the
host after each iteration and stops there, as every Krylov solver's stopping rule needs;
``check_every=None`` makes ``update`` free of host syncs (everything is ``torch.where`` on
0-d tensors) at the price of ``max_iters`` products per update (frozen iterations still
cost one each).

Followed by :func:`~soo_func.searches.trust_region`, the published ``curvature`` is the
operator the solve used (one linearization per update, see ``update_and_publish``) and
the direction is the trust region's warm start: a step inside the region is taken as
it is, so the model is not solved twice.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import krylov, oracles, tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.options import check_in, check_int_at_least, check_interval, check_nonnegative

PyTree = Any

__all__ = ["NewtonKrylovState", "newton_krylov"]

SOLVERS = ("cg", "cr", "minres")
FORCING = ("eisenstat_walker_1", "eisenstat_walker_2", "nocedal_wright")
GOLDEN = (1 + math.sqrt(5)) / 2


class NewtonKrylovState(NamedTuple):
    """State of :func:`newton_krylov` (all 0-d tensors).

    ``forcing_term``: the ``eta`` used at the last update; ``grad_norm`` and
    ``linear_residual``: ``||g||`` and ``||B d + g||`` there (for Eisenstat-Walker);
    ``num_hvps``: Hessian products made so far (with ``hvp_mode="linearize"`` the shared
    gradient pass of each update counts as one); ``krylov_iters``, ``negative_curvature``,
    ``fallback``: the last solve's iterations, whether it met negative curvature, and
    whether the direction fell back to ``-g``; ``count``: updates made.
    """

    forcing_term: torch.Tensor
    grad_norm: torch.Tensor
    linear_residual: torch.Tensor
    num_hvps: torch.Tensor
    krylov_iters: torch.Tensor
    negative_curvature: torch.Tensor
    fallback: torch.Tensor
    count: torch.Tensor


def _steepest_scale(matvec, grad: PyTree, grad_norm: torch.Tensor) -> torch.Tensor:
    """``|g|^2 / |g^T B g|`` (1 when ``g^T B g = 0``): the length of the fallback ``-g`` step.

    With positive curvature it is the minimizer of the quadratic model along ``-g``;
    with negative curvature the same length with ``|g^T B g|`` (as scipy's Newton-CG
    scales ``-g`` when CG meets negative curvature at its first iteration). One product.
    """
    curvature = tree.vdot(grad, matvec(grad)).abs()
    ok = torch.isfinite(curvature) & (curvature > 0)
    return torch.where(ok, grad_norm**2 / torch.where(ok, curvature, 1), 1)


def _forcing(
    forcing: str | float, state: NewtonKrylovState, grad_norm: torch.Tensor, eta_initial, eta_max
) -> torch.Tensor:
    """The forcing term ``eta_k`` (see the module docstring)."""
    if not isinstance(forcing, str):
        return torch.full_like(grad_norm, forcing)
    if forcing == "nocedal_wright":
        return torch.clamp(torch.sqrt(grad_norm), max=min(0.5, eta_max))
    previous = state.forcing_term
    safe_norm = torch.where(state.grad_norm > 0, state.grad_norm, torch.ones_like(grad_norm))
    if forcing == "eisenstat_walker_1":
        eta = (grad_norm - state.linear_residual).abs() / safe_norm
        floor = previous**GOLDEN
    else:
        eta = 0.9 * (grad_norm / safe_norm) ** 2
        floor = 0.9 * previous**2
    eta = torch.where(floor > 0.1, torch.maximum(eta, floor), eta)
    eta = torch.where(state.count == 0, torch.full_like(eta, eta_initial), eta)
    return torch.clamp(eta, max=eta_max)


def newton_krylov(
    solver: str = "cr",
    *,
    damping: float = 0.0,
    forcing: str | float = "eisenstat_walker_2",
    eta_initial: float = 0.5,
    eta_max: float = 0.9,
    max_iters: int | None = None,
    check_every: int | None = 1,
    hvp_mode: str = "linearize",
) -> Transform:
    """The inexact Newton direction ``d ~ -(H + damping I)^{-1} g`` from a Krylov solve.

    Args:
      solver: ``"cr"`` (conjugate residual, default), ``"cg"`` or ``"minres"``
        (:mod:`soo_func.krylov`).
      damping: ``lambda >= 0`` added to the Hessian (Levenberg-style regularization).
      forcing: ``"eisenstat_walker_2"`` (default), ``"eisenstat_walker_1"``,
        ``"nocedal_wright"`` or a constant in (0, 1): the solve's relative tolerance.
      eta_initial, eta_max: ``eta_0`` of the EW choices and the cap on every ``eta``.
      max_iters: the most Krylov iterations per update (default ``min(2 n, 100)``).
      check_every: an int ``k`` (default 1) checks convergence on the host every ``k``
        iterations and stops there; ``None`` never syncs: the solve runs ``max_iters``
        iterations, frozen once converged (each frozen one still costs a product).
      hvp_mode: how ``H v`` is computed (:func:`~soo_func.oracles.hvp_operator`):
        ``"linearize"`` (default: one gradient pass per update whose graph every
        product reuses, charged as one extra Hessian product), ``"forward-over-reverse"``
        (``jvp`` of the gradient) or ``"reverse-over-reverse"``.

    Needs the extra ``value_fn`` (and ``grad``, which :func:`~soo_func.chain` supplies).
    Publishes ``curvature`` (``v -> (H + damping I) v`` at ``params``, a fresh
    :func:`~soo_func.oracles.hvp_operator` in ``hvp_mode``) for a trust region, and the
    diagnostics ``newton_forcing_term``, ``newton_krylov_iters``,
    ``newton_negative_curvature`` and ``newton_fallback``.
    """
    who = "newton_krylov"
    check_in(who, "solver", solver, SOLVERS)
    if isinstance(forcing, str):
        if forcing not in FORCING:
            raise ValueError(
                f"newton_krylov: forcing must be one of {FORCING} or a number in (0, 1), "
                f"got {forcing!r}"
            )
    else:
        check_interval(who, "forcing (a constant forcing term)", forcing, 0, 1)
    check_interval(who, "eta_initial", eta_initial, 0, 1)
    check_interval(who, "eta_max", eta_max, 0, 1)
    check_nonnegative(who, "damping", damping)
    if max_iters is not None:
        check_int_at_least(who, "max_iters", max_iters, 1)
    if check_every is not None:
        check_int_at_least(who, "check_every", check_every, 1)
    check_in(who, "hvp_mode", hvp_mode, oracles.HVP_MODES)
    solve = getattr(krylov, solver)
    setup_cost = int(hvp_mode == "linearize")  # the shared gradient pass, charged as a product
    options = {} if solver == "minres" else {"stop_on_negative_curvature": True}

    def init(params: PyTree) -> NewtonKrylovState:
        ref = tree.leaves(params)[0]
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        count = torch.zeros((), dtype=torch.int64, device=ref.device)
        false = torch.zeros((), dtype=torch.bool, device=ref.device)
        # no two fields share a tensor (a compiled update would guard on the sharing)
        fields = (zero, zero, zero, count, count, false, false, count)
        return NewtonKrylovState(*(field.clone() for field in fields))

    def operator(params: PyTree, extra: dict) -> Any:
        return oracles.hvp_operator(extra["value_fn"], params, mode=hvp_mode, damping=damping)

    def update_with(matvec, updates: PyTree, state: NewtonKrylovState, params, extra: dict):
        grad = extra.get("grad")
        grad = updates if grad is None else grad
        n = sum(leaf.numel() for leaf in tree.leaves(grad))
        iters = min(2 * n, 100) if max_iters is None else max_iters
        grad_norm = tree.norm(grad)
        eta = _forcing(forcing, state, grad_norm, eta_initial, eta_max)
        if extra.get("model_only"):
            return tree.neg(grad), skipped_state(state, eta, grad_norm)
        result = solve(
            matvec, tree.neg(grad), rtol=eta, max_iters=iters, check_every=check_every, **options
        )
        slope = tree.vdot(grad, result.x)
        fallback = ~(slope < 0)  # no step taken, ascent, or NaN
        # The fallback's length costs a product: made on the device unless the solve
        # already syncs (check_every), where the host skips it when it is not needed
        # (traced or vmapped, the solve does not sync: the product is made).
        needed = check_every is None or not tree.host_reads_allowed() or bool(fallback)
        scale = _steepest_scale(matvec, grad, grad_norm) if needed else torch.ones_like(eta)
        direction = tree.where(fallback, tree.scale(scale, tree.neg(grad)), result.x)
        new_state = NewtonKrylovState(
            forcing_term=eta,
            grad_norm=grad_norm,
            linear_residual=torch.where(fallback, grad_norm, result.residual_norm),
            num_hvps=state.num_hvps + result.num_matvecs + setup_cost + int(needed),
            krylov_iters=result.num_iters,
            negative_curvature=result.negative_curvature,
            fallback=fallback,
            count=state.count + 1,
        )
        return direction, new_state

    def skipped_state(state: NewtonKrylovState, eta, grad_norm) -> NewtonKrylovState:
        """The state after a step whose solve a later member makes (``model_only``)."""
        zero = torch.zeros_like(state.krylov_iters)
        return state._replace(
            forcing_term=eta,
            grad_norm=grad_norm,
            linear_residual=grad_norm,
            num_hvps=state.num_hvps + setup_cost,
            krylov_iters=zero,
            negative_curvature=torch.zeros_like(state.negative_curvature),
            fallback=torch.zeros_like(state.fallback),
            count=state.count + 1,
        )

    def checked(params: PyTree, extra: dict) -> None:
        require_extras("newton_krylov", extra, "value_fn")
        if params is None:
            raise TypeError("newton_krylov needs params in update(updates, state, params, ...)")

    def update(updates: PyTree, state: NewtonKrylovState, params: PyTree = None, **extra: Any):
        checked(params, extra)
        return update_with(operator(params, extra), updates, state, params, extra)

    def diagnostics(state: NewtonKrylovState) -> dict:
        return {
            "newton_forcing_term": state.forcing_term,
            "newton_krylov_iters": state.krylov_iters,
            "newton_negative_curvature": state.negative_curvature,
            "newton_fallback": state.fallback,
        }

    def publish(state: NewtonKrylovState, params: PyTree = None, **extra: Any) -> dict:
        out = diagnostics(state)
        if params is not None and extra.get("value_fn") is not None:
            out["curvature"] = operator(params, extra)
        return out

    def update_and_publish(updates, state: NewtonKrylovState, params: PyTree = None, **extra):
        """``update`` then ``publish``, with one operator (one linearization) for both: the
        published ``curvature`` is the operator the solve used."""
        checked(params, extra)
        matvec = operator(params, extra)
        direction, new_state = update_with(matvec, updates, state, params, extra)
        out = {**diagnostics(new_state), "curvature": matvec}
        if extra.get("model_only"):
            out["direction_skipped"] = True
        return direction, new_state, out

    return guarded(who, Transform(init, update, publish, update_and_publish), NewtonKrylovState)
