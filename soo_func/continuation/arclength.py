"""Pseudo-arclength path following of a gradient homotopy: :func:`arclength_homotopy`.

The zero curve of ``H(x, t) = grad f_t(x) = 0`` of a built-in
:class:`~soo_func.continuation.family.Family` is followed in ``z = (x, c t)``
(``c = max(|x0|, 1)``, so that ``t`` and ``x`` share a unit) by its arclength, with ``t``
an unknown: the curve may pass turning points (folds), where ``t`` decreases, and cross
``t = 1`` more than once (Allgower & Georg, *Introduction to Numerical Continuation
Methods*, 2003, ch. 2-3). Keller's curve keeps the gradient parallel to ``grad f(x0)`` and
passes through several stationary points of ``f`` at ``t = 1`` (Branin's method, Branin
1972), minimizers and saddles; the convex family's is the fixed-point homotopy of
probability-one methods (Chow, Mallet-Paret & Yorke 1978).

With ``descend_first`` (default) the chain first minimizes ``f`` from ``x0`` on its own;
the point it reaches is the first candidate minimizer, and the curve from ``x0`` then
looks for better ones (Branin's use of the curve; it also means the homotopy ends no
worse than the plain chain whenever the latter converges within ``max_descent_steps``).

One update is one predictor-corrector step (Allgower & Georg Algorithm 3.1.1): the Euler
predictor ``z + h tau`` along the unit tangent ``tau`` (the null vector of
``J = [H_x  H_t]``, oriented as the previous one: ``tau`` is the previous tangent
projected on the null space of ``J``) and the pseudo-arclength Newton corrector
``z <- z + u``, ``J u = -H(z)``, ``u`` orthogonal to ``tau`` (Allgower & Georg section
2.3 / 3.3; Keller 1977). Both are minimum-norm solves (:class:`~soo_func.continuation.curve.Curve`):
dense (``J`` from ``n`` Hessian-vector products, pseudo-inverse; the default for
``n <= 50``) or matrix-free, MINRES on a symmetric saddle-point system (two
Hessian-vector products per iteration). The arclength step ``h`` halves (a retry in the
same update) when the corrector's first step exceeds ``h / 2`` or stops contracting by
half, and doubles after a corrector that converged within three iterations.

Where the curve crosses ``t = 1`` the point is refined by Newton at ``t = 1`` (on
``grad f = 0``) and tested with Lanczos (the smallest Ritz value of ``n`` steps): a
minimizer (positive semidefinite Hessian) is a candidate, a saddle is passed and the
curve followed on (Branin). After ``max_minimizers`` candidates, ``max_path_steps``
steps, or a step below ``min_step``, the point jumps to the candidate of least ``f``
(to ``x0`` when there is none: the plain chain as without a homotopy) and the chained
optimizer minimizes ``f`` from there; the driver's ``gtol`` decides. While on the curve
the point is handed downstream as ``params_offset`` with the objective
``p -> f_t(p + offset)``. The decisions are taken on the host in ``update`` (syncs
counted in ``state.num_syncs``); ``publish`` reads no tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.continuation.curve import Curve
from soo_func.continuation.family import Anchor, default_curvature, make_family
from soo_func.continuation.follower import Handoff, blank, follower, publish_handoff
from soo_func.continuation.options import ArclengthOptions, check_arclength_options
from soo_func.oracles import value_and_grad

PyTree = Any

__all__ = ["ArclengthState", "arclength_homotopy"]

_DENSE_MAX_SIZE = 50


class ArclengthState(NamedTuple):
    """State of :func:`arclength_homotopy` (0-d tensors on the params' device).

    ``point``/``t`` is the last point on the curve, ``tangent``/``tangent_t`` its unit
    tangent in ``z = (x, c t)``, ``step`` the arclength step; ``best``/``best_value`` the
    candidate minimizer of least ``f``; ``handoff`` the objective handed downstream by
    the last update (``None``: ``f`` itself, at params).
    """

    started: torch.Tensor
    descending: torch.Tensor
    descent_steps: torch.Tensor
    finished: torch.Tensor
    anchor: PyTree
    anchor_grad: PyTree
    anchor_curvature: torch.Tensor
    t_unit: torch.Tensor
    point: PyTree
    t: torch.Tensor
    tangent: PyTree
    tangent_t: torch.Tensor
    step: torch.Tensor
    num_path_steps: torch.Tensor
    num_rejections: torch.Tensor
    num_crossings: torch.Tensor
    num_minimizers: torch.Tensor
    best: PyTree
    best_value: torch.Tensor
    handoff: Handoff | None
    num_syncs: torch.Tensor


def arclength_homotopy(
    family: str = "keller",
    *,
    initial_arclength: float = 0.1,
    max_step: float = 10.0,
    min_step: float = 1e-8,
    max_path_steps: int = 200,
    max_minimizers: int = 2,
    descend_first: bool = True,
    descent_gtol: float = 1e-6,
    max_descent_steps: int = 200,
    max_corrector_iters: int = 6,
    corrector_tol: float = 1e-8,
    krylov_rtol: float = 1e-10,
    krylov_max_iters: int | None = None,
    solver: str = "auto",
) -> Transform:
    """Arclength continuation on the gradient equation; chain it first, e.g.
    ``chain(arclength_homotopy(), newton_krylov(), armijo())`` (see the module docstring).

    Args:
      family: ``"keller"`` (default) or ``"convex"``.
      initial_arclength: the first arclength step, in units of ``c = max(|x0|, 1)``.
      max_step, min_step: the largest and smallest arclength steps, in the same units.
      max_path_steps: predictor-corrector steps (updates) before leaving the curve.
      max_minimizers: candidate minimizers at ``t = 1`` before leaving the curve.
      descend_first: first let the chain minimize ``f`` from ``x0`` (until
        ``|grad f|_inf <= descent_gtol`` or ``max_descent_steps`` steps); its point is the
        first candidate, and the curve from ``x0`` looks for better ones (Branin's use).
      max_corrector_iters: Newton corrector iterations per step (more: the step halves).
      corrector_tol: the corrector stops when ``|dz| <= corrector_tol (1 + |z|)`` (at
        least ``100 eps`` of the params' dtype).
      krylov_rtol, krylov_max_iters: the MINRES solves (``rtol`` at least ``10 eps``;
        default ``max(4 (2n + 1), 30)`` iterations).
      solver: ``"dense"`` (the Jacobian from ``n`` Hessian products, pseudo-inverse
        solves), ``"minres"`` (matrix-free) or ``"auto"`` (dense for ``n <= 50``).

    Needs the extras ``value``, ``grad``, ``value_fn``.
    """
    if family not in ("keller", "convex"):
        raise ValueError(
            f"arclength_homotopy: family must be 'keller' or 'convex', got {family!r} "
            "(user families: use homotopy(family) with its minimizer path)"
        )
    options = ArclengthOptions(
        family=make_family(family), initial_arclength=initial_arclength, max_step=max_step,
        min_step=min_step, max_path_steps=max_path_steps, max_minimizers=max_minimizers,
        descend_first=descend_first, descent_gtol=descent_gtol,
        max_descent_steps=max_descent_steps, max_corrector_iters=max_corrector_iters,
        corrector_tol=corrector_tol, krylov_rtol=krylov_rtol,
        krylov_max_iters=krylov_max_iters, solver=solver,
    )  # fmt: skip
    check_arclength_options(options)
    transform = follower("arclength_homotopy", options, _init, _update, _publish)
    return guarded("arclength_homotopy", transform, ArclengthState)


def _init(options: ArclengthOptions, params: PyTree) -> ArclengthState:
    zero, count, false, zeros = blank(params)
    return ArclengthState(
        started=false,
        descending=false | options.descend_first,
        descent_steps=count,
        finished=false,
        anchor=zeros,
        anchor_grad=zeros,
        anchor_curvature=zero,
        t_unit=zero,
        point=zeros,
        t=zero,
        tangent=zeros,
        tangent_t=zero,
        step=zero,
        num_path_steps=count,
        num_rejections=count,
        num_crossings=count,
        num_minimizers=count,
        best=zeros,
        best_value=zero + math.inf,
        handoff=None,
        num_syncs=count,
    )


def _anchor(state: ArclengthState) -> Anchor:
    return Anchor(state.anchor, state.anchor_grad, state.anchor_curvature)


def _start(options: ArclengthOptions, state: ArclengthState, params, f_grad) -> ArclengthState:
    """The first update: the anchor, the unit ``c`` of ``t`` and the first step."""
    c = torch.clamp(tree.norm(params), min=1.0).to(state.t.dtype)
    s = default_curvature(params, f_grad).to(state.t.dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return state._replace(
        started=torch.ones_like(state.started),
        anchor=params,
        anchor_grad=f_grad,
        anchor_curvature=s,
        t_unit=c,
        point=params,
        step=options.initial_arclength * c,
    )


def _curve(options: ArclengthOptions, state: ArclengthState, base: Callable, params) -> Curve:
    eps = torch.finfo(state.t.dtype).eps  # float32: tolerances at its rounding
    size = sum(leaf.numel() for leaf in tree.leaves(params))
    dense = options.solver == "dense" or (options.solver == "auto" and size <= _DENSE_MAX_SIZE)
    return Curve(
        family=options.family,
        base=base,
        anchor=_anchor(state),
        c=state.t_unit,
        krylov_rtol=max(options.krylov_rtol, 10 * eps),
        krylov_iters=options.krylov_max_iters,
        tol=max(options.corrector_tol, 100 * eps),
        max_corrector_iters=options.max_corrector_iters,
        dense=dense,
    )


def _corrected_step(options: ArclengthOptions, curve: Curve, state: ArclengthState):
    """The predictor-corrector step from the last point, halving ``h`` after each
    rejection: ``(accepted or None below min_step, h, rejections, iters, syncs)``."""
    x, w, c = state.point, state.t * curve.c, float(curve.c)
    h, rejections, syncs = float(state.step), 0, 0
    while True:
        accepted, iters = curve.predict_correct(x, w, state.tangent, state.tangent_t, h)
        syncs += iters
        if accepted is not None:
            return accepted, h, rejections, iters, syncs
        h *= 0.5
        rejections += 1
        if h < options.min_step * c:
            return None, h, rejections, iters, syncs


def _record_crossing(curve: Curve, state: ArclengthState, x, w, x_new, w_new):
    """A crossing of ``t = 1``: refine it, and keep it when it is the best minimizer."""
    x_one, value, minimizer = curve.refine_crossing(x, w, x_new, w_new)
    state = state._replace(num_crossings=state.num_crossings + 1)
    if minimizer and math.isfinite(float(value)):
        better = bool(value < state.best_value)
        state = state._replace(
            num_minimizers=state.num_minimizers + 1,
            best=x_one if better else state.best,
            best_value=torch.minimum(value, state.best_value),
        )
    return state


def _path_step(options: ArclengthOptions, state: ArclengthState, base, params):
    """One predictor-corrector step on the curve (or the end of the curve): ``(state, syncs)``."""
    curve = _curve(options, state, base, params)
    c = float(curve.c)
    x, w = state.point, state.t * curve.c
    if int(state.num_path_steps) == 0:
        _, grad, _ = curve.residual(x, state.t)
        e_w = torch.ones_like(w)
        tau_x, tau_w = curve.tangent(x, state.t, grad, tree.zeros_like(x), e_w)
        state = state._replace(tangent=tau_x, tangent_t=tau_w)
    accepted, h, rejections, iters, syncs = _corrected_step(options, curve, state)
    state = state._replace(num_rejections=state.num_rejections + rejections)
    if accepted is None:
        return _finish(state, base, params), syncs
    x_new, w_new, f_new, grad = accepted
    if iters <= 3:
        h = min(2 * h, options.max_step * c)
    tau_x, tau_w = curve.tangent(x_new, w_new / c, grad, state.tangent, state.tangent_t)
    state = state._replace(
        point=x_new,
        t=w_new / curve.c,
        tangent=tau_x,
        tangent_t=tau_w,
        step=torch.full_like(state.step, h),
        num_path_steps=state.num_path_steps + 1,
    )
    if (float(w) - c) * (float(w_new) - c) <= 0 and float(w) != c:  # crossed t = 1
        syncs += 1
        state = _record_crossing(curve, state, x, w, x_new, w_new)
    done = int(state.num_minimizers) >= options.max_minimizers
    if done or int(state.num_path_steps) >= options.max_path_steps:
        return _finish(state, base, params), syncs
    t = state.t
    v_t, g_t = options.family.compose(curve.anchor, x_new, t, f_new, grad)
    offset = tree.sub(x_new, params)
    return state._replace(handoff=Handoff(v_t, g_t, t=t, offset=offset)), syncs


def _finish(state: ArclengthState, base, params) -> ArclengthState:
    """Leave the curve: jump to the best candidate (``x0`` when there is none) and hand
    on ``f`` seen from there."""
    found = bool(torch.isfinite(state.best_value))
    offset = tree.sub(state.best if found else state.anchor, params)
    value, grad = value_and_grad(base)(tree.add(params, offset))  # the point seen downstream
    return state._replace(
        finished=torch.ones_like(state.finished),
        t=torch.ones_like(state.t),
        handoff=Handoff(value, grad, offset=offset),
    )


def _descend(options: ArclengthOptions, state: ArclengthState, params, f_value, f_grad):
    """One step of the plain chain; at its end the point becomes the first candidate."""
    small = tree.norm(f_grad, math.inf) <= options.descent_gtol
    if not bool(small | (state.descent_steps >= options.max_descent_steps)):
        return state._replace(descent_steps=state.descent_steps + 1)
    finite = torch.isfinite(f_value)
    return state._replace(
        descending=torch.zeros_like(state.descending),
        best=params,
        best_value=torch.where(finite, f_value, state.best_value),
    )


def _update(options: ArclengthOptions, state: ArclengthState, params, base, f_value, f_grad):
    """Descend, or take a step on the curve, or hand on ``f`` after leaving it; the
    decisions read the state on the host (counted in ``num_syncs``)."""
    syncs = 1
    if not bool(state.started):
        state = _start(options, state, params, f_grad)
    if bool(state.descending):
        state, syncs = _descend(options, state, params, f_value, f_grad), syncs + 1
    if bool(state.descending) or bool(state.finished):
        new = state._replace(handoff=None)
    else:
        new, more = _path_step(options, state, base, params)
        syncs += more
    grad = f_grad if new.handoff is None else new.handoff.grad
    return grad, new._replace(num_syncs=new.num_syncs + syncs)


def _publish(options: ArclengthOptions, state: ArclengthState, base) -> dict[str, Any]:
    """The diagnostics, the incumbent and, while the point is moved, the objective seen
    from there. Reads no tensor on the host."""
    out: dict[str, Any] = {
        "continuation_t": state.t,
        "continuation_path_steps": state.num_path_steps,
        "continuation_rejections": state.num_rejections,
        "continuation_crossings": state.num_crossings,
        "continuation_minimizers": state.num_minimizers,
        "continuation_descent_steps": state.descent_steps,
        "continuation_restart": torch.full_like(state.finished, state.handoff is not None),
        "converged_ok": state.finished,
        # The best minimizer found so far (inf before the first): a run stopped while
        # the point is on the curve returns it (see soo_func.drivers.minimize).
        "incumbent_params": state.best,
        "incumbent_value": state.best_value,
    }
    if base is not None and state.handoff is not None:
        out.update(publish_handoff(options.family, base, _anchor(state), state.handoff))
    return out
