"""The minimizer-path follower: :func:`minimizer_homotopy` (``homotopy(path="minimizers")``).

It follows the path of minimizers ``x(t)`` of a :class:`~soo_func.continuation.family.Family`
``f_t`` from ``t = 0`` to ``t = 1`` (Allgower & Georg, *Introduction to Numerical
Continuation Methods*, 2003, ch. 2; Nocedal & Wright, 2nd ed., section 11.3); how each
family's path looks is in :mod:`~soo_func.continuation.family`.

Path following (Allgower & Georg Algorithm 2.2.3, predictor-corrector). At a path point
``x_k = x(t_k)`` (``|grad f_{t_k}(x_k)|_inf <= tol_{t_k}``, with
``tol_t = corrector_rtol (1 - t) |grad f(x0)|_inf``: it tightens as ``f_t`` nears ``f``)
the predictor follows the tangent ``dx/dt`` (:func:`~soo_func.continuation.path_tangent`):
``x_pred = x_k + (t_{k+1} - t_k) dx/dt``, kept when ``f_{t_{k+1}}`` is finite there and
not above its value at ``x_k``. The chained optimizer is the corrector: it minimizes
``f_{t_{k+1}}`` from ``x_pred``. The stage step grows (``grow``) when the corrector reached
``tol`` within ``fast_steps`` steps, and shrinks (``shrink``) with a retry from ``x_k``
when it did not within ``max_corrector_steps``; below ``min_step`` the continuation is
abandoned and the chain minimizes ``f`` from where it is. The last stage, ``t = 1``, is
the plain chain on ``f`` from the predicted point, ended only by the driver's ``gtol``
(``retry_last_stage``).

Published: ``value_fn``, ``value``, ``grad`` (of ``f_t``, while ``t < 1`` or the point
moved) with ``recover_objective`` (built-in families, convex from ``t >= 0.1``: ``f`` and
``grad f`` from ``f_t`` and ``grad f_t`` at the same point, so the driver reuses the
search's evaluation of the accepted point), ``params_offset`` (when the point moves: a
predictor jump or a retry, see ``docs/design.md``), ``converged_ok`` (false before
``t = 1``), ``continuation_restart`` and the history diagnostics ``continuation_t``,
``continuation_t_path``, ``continuation_stage``, ``continuation_step``,
``continuation_retries``, ``continuation_grad_norm``. Evaluations of ``f_t`` are charged
to the driver's counted objective. Host syncs: the stage logic decides on the host in
``update`` (like a line search), about two syncs per update, counted in
``state.num_syncs``; ``publish`` reads no tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.continuation.family import Anchor, Family, UserFamily, default_curvature, make_family
from soo_func.continuation.follower import (
    ChargedObjective,
    Handoff,
    blank,
    follower,
    publish_handoff,
    raw_objective,
)
from soo_func.continuation.options import (
    MinimizerPathOptions,
    check_minimizer_path_options,
    fixed_schedule,
)
from soo_func.continuation.tangent import path_tangent
from soo_func.oracles import value_and_grad

PyTree = Any

__all__ = ["HomotopyState", "minimizer_homotopy"]


class HomotopyState(NamedTuple):
    """State of :func:`minimizer_homotopy` (scalars are 0-d tensors on the params' device).

    ``t`` is the target of the current stage, ``t_path`` that of the last path point
    ``path_point`` (with ``path_value``/``path_grad`` of ``f`` there and the path
    ``tangent``); ``step`` the stage step, ``corrector_steps`` the updates of this stage.
    ``handoff`` is the objective handed downstream by the last update (``None``: ``f``).
    """

    started: torch.Tensor
    t: torch.Tensor
    t_path: torch.Tensor
    step: torch.Tensor
    stage: torch.Tensor
    corrector_steps: torch.Tensor
    num_retries: torch.Tensor
    abandoned: torch.Tensor
    tolerance: torch.Tensor
    anchor_curvature: torch.Tensor
    anchor: PyTree
    anchor_grad: PyTree
    path_point: PyTree
    path_value: torch.Tensor
    path_grad: PyTree
    tangent: PyTree
    grad_norm: torch.Tensor
    handoff: Handoff | None
    num_syncs: torch.Tensor


def minimizer_homotopy(
    family: str | UserFamily = "convex",
    *,
    schedule: str | Sequence[float] = "linear",
    stage_step: float | None = None,
    max_step: float | None = None,
    min_step: float = 1e-3,
    grow: float = 2.0,
    shrink: float = 0.5,
    fast_steps: int = 3,
    max_corrector_steps: int = 10,
    corrector_rtol: float = 1e-2,
    corrector_atol: float = 0.0,
    shrink_tolerance: bool = True,
    retry_last_stage: bool = False,
    final_gap: float = 1e-3,
    anchor_curvature: float | None = None,
    predictor: str = "tangent",
    tangent_rtol: float = 1e-6,
    tangent_max_iters: int | None = None,
) -> Transform:
    """Follow the minimizers of ``f_t`` from ``t = 0`` to ``t = 1``; chain it first, e.g.
    ``chain(minimizer_homotopy("convex"), newton_krylov(), armijo())`` (see the module
    docstring; ``homotopy(family, ...)`` builds it for ``family`` given).

    Args:
      family: ``"convex"``, ``"keller"`` or a callable ``family(params, t)``.
      schedule: how ``t`` advances: ``"linear"`` (``t + step``), ``"exponential"``
        (``1 - t`` times ``exp(-step)``, snapped to 1 below ``final_gap``) or a fixed
        increasing sequence of ``t`` values ending at 1 (no adaptation, no retries).
      stage_step: the first stage step, in ``t`` (linear) or in ``-log(1 - t)``
        (exponential); default 0.25 linear, 1.0 exponential.
      max_step: the largest stage step (default 1.0 linear, 8.0 exponential).
      min_step: below this the continuation is abandoned (it jumps to ``t = 1``).
      grow, shrink: step factors after a fast corrector / a failed one.
      fast_steps: a corrector that reached ``tol`` within this many steps is fast.
      max_corrector_steps: steps before a stage counts as failed (retry from the path).
      corrector_rtol, corrector_atol: ``tol_t = max(corrector_rtol (1 - t) |grad f(x0)|_inf,
        corrector_atol)`` on ``|grad f_t|_inf`` ends a stage ``t < 1`` (without the factor
        ``1 - t`` when ``shrink_tolerance=False``).
      shrink_tolerance: scale the stage tolerance by ``1 - t``, so that it tightens
        towards the driver's ``gtol`` as ``f_t`` approaches ``f``.
      retry_last_stage: ``False`` (default): the stage ``t = 1`` is the plain chain on
        ``f`` from the predicted point, stopped only by the driver (its ``gtol``); ``True``:
        a last stage slower than ``max_corrector_steps`` (to the stage tolerance) is
        retried from the last path point with a smaller step, like the others.
      final_gap: exponential schedule: ``t`` becomes 1 once ``1 - t <= final_gap``.
      anchor_curvature: the convex family's ``s`` (default ``|grad f(x0)| / max(|x0|, 1)``).
      predictor: ``"tangent"`` (Euler predictor) or ``"none"`` (warm start only).
      tangent_rtol, tangent_max_iters: the MINRES solve of the tangent.

    Needs the extras ``value``, ``grad``, ``value_fn``; returns ``grad f_t``.
    """
    exponential = schedule == "exponential"
    options = MinimizerPathOptions(
        family=make_family(family),
        fixed=fixed_schedule(schedule),
        exponential=exponential,
        stage_step=(1.0 if exponential else 0.25) if stage_step is None else stage_step,
        max_step=(8.0 if exponential else 1.0) if max_step is None else max_step,
        min_step=min_step, grow=grow, shrink=shrink, fast_steps=fast_steps,
        max_corrector_steps=max_corrector_steps, corrector_rtol=corrector_rtol,
        corrector_atol=corrector_atol, shrink_tolerance=shrink_tolerance,
        retry_last_stage=retry_last_stage, final_gap=final_gap, anchor_curvature=anchor_curvature,
        predictor=predictor, tangent_rtol=tangent_rtol, tangent_max_iters=tangent_max_iters,
    )  # fmt: skip
    check_minimizer_path_options(options)
    return guarded(
        "homotopy", follower("homotopy", options, _init, _update, _publish), HomotopyState
    )


def _init(options: MinimizerPathOptions, params: PyTree) -> HomotopyState:
    zero, count, false, zeros = blank(params)
    first_t = options.fixed[0] if options.fixed is not None else 0.0
    return HomotopyState(
        started=false,
        t=zero + first_t,
        t_path=zero,
        step=zero + options.stage_step,
        stage=count,
        corrector_steps=count,
        num_retries=count,
        abandoned=false,
        tolerance=zero,
        anchor_curvature=zero,
        anchor=zeros,
        anchor_grad=zeros,
        path_point=zeros,
        path_value=zero,
        path_grad=zeros,
        tangent=zeros,
        grad_norm=zero,
        handoff=None,
        num_syncs=count,
    )


def _anchor(state: HomotopyState) -> Anchor:
    return Anchor(state.anchor, state.anchor_grad, state.anchor_curvature)


def _start(options: MinimizerPathOptions, state: HomotopyState, params, f_grad) -> HomotopyState:
    """The first update: the anchor ``x0``, ``grad f(x0)``, ``s`` and the stage tolerance."""
    tol = options.corrector_rtol * tree.norm(f_grad, math.inf)
    if options.anchor_curvature is not None:
        s = torch.full_like(state.anchor_curvature, options.anchor_curvature)
    else:
        s = default_curvature(params, f_grad)
    return state._replace(
        started=torch.ones_like(state.started),
        tolerance=tol.to(state.t.dtype),
        anchor_curvature=s.to(state.t.dtype),
        anchor=params,
        anchor_grad=f_grad,
    )


def _advance(options: MinimizerPathOptions, t: float, step: float) -> float:
    """The next stage's ``t`` after ``t`` with the stage step ``step``."""
    if options.fixed is not None:
        return next((p for p in options.fixed if p > t + 1e-6), 1.0)
    if options.exponential:
        new = 1.0 - (1.0 - t) * math.exp(-step)
        if 1.0 - new <= options.final_gap:
            new = 1.0
    else:
        new = t + step
    return 1.0 if new >= 1.0 - 1e-12 else new


def _family_at(family: Family, base: Callable, anchor: Anchor, t) -> ChargedObjective:
    """``p -> f_t(p)`` at a fixed ``t``, its evaluations charged to ``base``."""
    fam = family.objective(raw_objective(base), anchor)
    return ChargedObjective(lambda p: fam(p, t), base)


def _objective_at(family: Family, base, anchor: Anchor, x, t, f_value=None, f_grad=None):
    """``f_t`` and its gradient at ``x`` (composed from ``f`` there when known)."""
    if family.builtin:
        if f_value is None:
            f_value, f_grad = value_and_grad(base)(x)
        return family.compose(anchor, x, t, f_value, f_grad)
    return value_and_grad(_family_at(family, base, anchor, t))(x)


def _handoff(options, t: torch.Tensor, t_host: float, value, grad, offset=None) -> Handoff:
    """The handed ``f_t`` at ``t`` (``t_host`` its value, read by the update): with its
    exact recovery for the built-in families (convex: from ``min_recover_t``)."""
    family = options.family
    # compared in t's dtype, as the tensor t would be, on the host value: no device sync
    exact = family.builtin and bool(torch.tensor(t_host, dtype=t.dtype) >= family.min_recover_t)
    return Handoff(value, grad, t=t, offset=offset, recover_t=t if exact else None)


def _predict(options, base, state: HomotopyState, params, t_new: float, tangent):
    """Start the stage ``t_new``: at the tangent predictor's point when ``f_{t_new}`` is
    finite there and not above its value at the path point, else at the path point.
    Returns ``(state, grad f_{t_new} at the start, syncs)``."""
    family, anchor = options.family, _anchor(state)
    t = torch.full_like(state.t, t_new)
    point, value, grad = state.path_point, None, None
    syncs = 0
    if options.predictor == "tangent":
        x_pred = tree.axpy(t - state.t_path, tangent, state.path_point)
        v_pred, g_pred = _objective_at(family, base, anchor, x_pred, t)
        if family.builtin:
            v_alt = family.value(anchor, state.path_point, t, state.path_value)
        else:
            v_alt = _family_at(family, base, anchor, t)(state.path_point)
        ok = torch.isfinite(v_pred) & torch.isfinite(tree.norm(g_pred)) & (v_pred <= v_alt)
        syncs += 1
        if bool(ok):
            point, value, grad = x_pred, v_pred, g_pred
    if value is None:
        known = (state.path_value, state.path_grad) if family.builtin else (None, None)
        value, grad = _objective_at(family, base, anchor, state.path_point, t, *known)
    offset = tree.sub(point, params)
    new = state._replace(
        t=t,
        corrector_steps=torch.ones_like(state.corrector_steps),
        handoff=_handoff(options, t, t_new, value, grad, offset),
    )
    return new, grad, syncs


def _next_stage(options, base, state: HomotopyState, params, f_value, f_grad, flags):
    """The stage ended at ``params``: record the path point, its tangent, and predict."""
    t, _, step, steps, stage = flags[1:6]
    if options.fixed is None and stage >= 1 and steps <= options.fast_steps:
        step = min(step * options.grow, options.max_step)
    state = state._replace(
        t_path=state.t,
        path_point=params,
        path_value=f_value,
        path_grad=f_grad,
        stage=state.stage + 1,
        step=torch.full_like(state.step, step),
    )
    tangent = state.tangent
    if options.predictor == "tangent":
        fam = ChargedObjective(options.family.objective(raw_objective(base), _anchor(state)), base)
        tangent = path_tangent(
            fam, params, state.t, rtol=options.tangent_rtol, max_iters=options.tangent_max_iters
        )
    state = state._replace(tangent=tangent)
    return _predict(options, base, state, params, _advance(options, t, step), tangent)


def _retry(options, base, state: HomotopyState, params, f_value, f_grad, flags):
    """The stage failed: shrink the step and restart it from the path point, or abandon
    the continuation below ``min_step`` (``t = 1`` from ``params``)."""
    t_path, step = flags[2], flags[3] * options.shrink
    state = state._replace(
        step=torch.full_like(state.step, step), num_retries=state.num_retries + 1
    )
    if step >= options.min_step:
        return _predict(
            options, base, state, params, _advance(options, t_path, step), state.tangent
        )
    one = torch.ones_like(state.t)
    _, g1 = _objective_at(options.family, base, _anchor(state), params, one, f_value, f_grad)
    new = state._replace(
        t=one,
        abandoned=torch.ones_like(state.abandoned),
        corrector_steps=torch.ones_like(state.corrector_steps),
        handoff=None,
    )
    return new, g1, 0


def _stage_tolerance(options: MinimizerPathOptions, state: HomotopyState) -> torch.Tensor:
    """``max(tol (1 - t), corrector_atol)`` (without ``1 - t`` at ``t = 1`` or when
    ``shrink_tolerance`` is off: the last stage, when retried, keeps the unshrunk one)."""
    tol = state.tolerance
    if options.shrink_tolerance:
        tol = tol * torch.where(state.t < 1, 1 - state.t, torch.ones_like(state.t))
    return torch.clamp(tol, min=options.corrector_atol)


def _stay(options, state: HomotopyState, v_t, g_t, t_host: float, **changes):
    """Another corrector step on ``f_t`` (``f`` itself handed on once ``t = 1``)."""
    handoff = None if t_host >= 1.0 else _handoff(options, state.t, t_host, v_t, g_t)
    new = state._replace(corrector_steps=state.corrector_steps + 1, handoff=handoff, **changes)
    return new, g_t, 0


def _update(options: MinimizerPathOptions, state: HomotopyState, params, base, f_value, f_grad):
    """Correct on, end the stage (and predict the next one) or retry it; the decision reads
    the state on the host once (counted in ``num_syncs``, with the predictor's test)."""
    syncs = 1
    if not bool(state.started):
        state = _start(options, state, params, f_grad)
    v_t, g_t = _objective_at(options.family, base, _anchor(state), params, state.t, f_value, f_grad)
    gnorm = tree.norm(g_t, math.inf)
    flags = torch.stack([
        (gnorm <= _stage_tolerance(options, state)).double(), state.t.double(),
        state.t_path.double(), state.step.double(), state.corrector_steps.double(),
        state.stage.double(), state.abandoned.double(),
    ]).tolist()  # fmt: skip
    syncs += 1
    converged, t, t_path, _, steps, stage, abandoned = flags
    state = state._replace(grad_norm=gnorm)
    stage_failed = options.fixed is None and stage >= 1 and steps >= options.max_corrector_steps
    if t >= 1.0 and (t_path >= 1.0 or abandoned or not options.retry_last_stage):
        new, grad, more = _stay(options, state, v_t, g_t, t)  # past the last path point
    elif t >= 1.0 and converged:
        new, grad, more = _stay(options, state, v_t, g_t, t, t_path=state.t, stage=state.stage + 1)
    elif converged:
        new, grad, more = _next_stage(options, base, state, params, f_value, f_grad, flags)
    elif stage_failed:
        new, grad, more = _retry(options, base, state, params, f_value, f_grad, flags)
    else:
        new, grad, more = _stay(options, state, v_t, g_t, t)
    return grad, new._replace(num_syncs=new.num_syncs + syncs + more)


def _publish(options: MinimizerPathOptions, state: HomotopyState, base) -> dict[str, Any]:
    """The diagnostics and, when the last update handed on ``f_t`` (or moved the point),
    the rewritten objective. Reads no tensor on the host."""
    out: dict[str, Any] = {
        "continuation_t": state.t,
        "continuation_t_path": state.t_path,
        "continuation_stage": state.stage,
        "continuation_step": state.step,
        "continuation_retries": state.num_retries,
        "continuation_grad_norm": state.grad_norm,
        "continuation_restart": state.corrector_steps == 1,
        "converged_ok": state.t >= 1,
    }
    if base is not None and state.handoff is not None:
        out.update(publish_handoff(options.family, base, _anchor(state), state.handoff))
    return out
