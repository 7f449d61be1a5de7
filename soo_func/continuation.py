"""Homotopy continuation as a chain member: :func:`homotopy`.

A homotopy replaces the objective ``f`` by a family ``f_t``, ``t`` in ``[0, 1]``, with
``f_1 = f`` and ``f_0`` easy, and follows the path of minimizers ``x(t)`` from ``t = 0``
to ``t = 1`` (Allgower & Georg, *Introduction to Numerical Continuation Methods*, 2003,
ch. 2; Nocedal & Wright, 2nd ed., section 11.3). ``homotopy()`` (no family) is instead
Keller's curve followed by arclength through its folds, after the chain's own descent
(:mod:`soo_func.continuation_arclength`, ``path="arclength"``): from 10x and 100x the
standard MGH starts it solved one more problem than Newton alone and none fewer, where
the minimizer path below solved as many at 10x. Families of the minimizer path:

``"convex"`` (``homotopy("convex")``, the default before)
    ``f_t(x) = t f(x) + (1 - t) (scale / 2) |x - x0|^2`` (Allgower & Georg section 1.1),
    ``scale = |grad f(x0)| / max(|x0|, 1)`` unless given. ``x0`` minimizes the strongly
    convex ``f_0``, and ``x(t)`` is a path of *minimizers* (a proximal path: ``x(t)``
    minimizes ``f + lam/2 |x - x0|^2`` with ``lam = (1 - t) scale / t``), so a descent
    corrector can follow it; at a fold it falls to another minimizer of ``f_t``.
``"keller"``
    Keller's global Newton homotopy on the gradient equation (Keller 1978, "Global
    homotopies and Newton methods"): ``grad f(x) - (1 - t) grad f(x0) = 0``, the
    gradient of ``f_t(x) = f(x) - (1 - t) <grad f(x0), x>``. ``x0`` is on the path at
    ``t = 0``. With ``schedule="exponential"`` the factor ``1 - t`` is ``exp(-s)``: the
    stages are steps in ``s`` and the path is that of the continuous Newton flow
    ``dx/ds = -H^{-1} grad f`` (Smale 1976; Branin 1972). Its points are stationary
    points of ``f_t``, saddles where the Hessian at ``x0`` is indefinite, which a descent
    corrector cannot track, and along a curved valley it advances only as ``1 - t``
    reaches ``|grad f| / |grad f(x0)|`` (Rosenbrock from 100x the standard start: about
    ``1e-6``). From far starts (``benchmarks/bench_homotopy.py``) it solves fewer
    problems than plain Newton on this path.
a callable ``family(params, t) -> 0-d loss``
    A user family with ``family(params, 1) == f(params)`` (smoothing, regularization or
    penalty continuation). ``x0`` need not be on its path: stage 0 solves ``t = 0``.

Path following (Allgower & Georg Algorithm 2.2.3, predictor-corrector). At a path point
``x_k = x(t_k)`` (``|grad f_{t_k}(x_k)|_inf <= tol_{t_k}``, with
``tol_t = corrector_rtol (1 - t) |grad f(x0)|_inf``: it tightens as ``f_t`` nears ``f``)
the predictor follows the tangent
``dx/dt = -(d^2 f_t / dx^2)^{-1} d/dt grad f_t`` (the implicit function theorem on
``grad f_t(x(t)) = 0``), solved matrix-free by MINRES on Hessian-vector products, with
``d/dt grad f_t`` a ``jvp`` in ``t``: ``x_pred = x_k + (t_{k+1} - t_k) dx/dt``. The
chained optimizer is the corrector: it minimizes ``f_{t_{k+1}}`` from ``x_pred``. The
step in ``t`` grows (``grow``) when the corrector reached ``tol`` within ``fast_steps``
steps, and shrinks (``shrink``) with a retry from ``x_k`` when it did not within
``max_corrector_steps``; below ``min_step`` the continuation is abandoned and the chain
minimizes ``f`` from where it is. The last stage, ``t = 1``, is the plain chain on ``f``
from the predicted point, ended only by the driver's ``gtol`` (``retry_last_stage``).

How the point moves (predictor jumps, retries): the ``params_offset`` extension of the
publish channel, described in ``docs/design.md`` (section 3).

Published: ``value_fn``, ``value``, ``grad`` (of ``f_t``, while ``t < 1`` or shifted)
with ``recover_objective`` (built-in families: ``f`` and ``grad f`` from ``f_t`` and
``grad f_t`` at the same point, so the driver reuses the search's evaluation of the
accepted point instead of evaluating ``f`` there again),
``params_offset`` (when the point moves), ``converged_ok`` (false before ``t = 1``) and
the history diagnostics ``continuation_t``, ``continuation_t_path``,
``continuation_stage``, ``continuation_step``, ``continuation_retries``,
``continuation_grad_norm``. Evaluations of ``f_t`` are charged to the driver's counted
objective. Host syncs: the stage logic decides on the host (like a line search), about
two syncs per update, counted in ``state.num_syncs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, require_extras
from soo_func.continuation_arclength import arclength_homotopy
from soo_func.continuation_path import (
    _ChargedObjective,
    _check_homotopy_args,
    _compose,
    _family_fn,
    _raw,
    _recovery,
    path_tangent,
)
from soo_func.oracles import value_and_grad

PyTree = Any
Family = Callable[[PyTree, torch.Tensor], torch.Tensor]

__all__ = ["HomotopyState", "homotopy"]


class HomotopyState(NamedTuple):
    """State of :func:`homotopy` (scalars are 0-d tensors on the params' device).

    ``t`` is the target of the current stage, ``t_path`` that of the last path point
    ``path_point`` (with ``path_value``/``path_grad`` of ``f`` there and the path
    ``tangent``). ``value``/``grad``/``offset`` describe the objective handed downstream
    by the last update (``shifted``: the point moved by ``offset``).
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
    scale: torch.Tensor
    anchor: PyTree
    anchor_grad: PyTree
    path_point: PyTree
    path_value: torch.Tensor
    path_grad: PyTree
    tangent: PyTree
    value: torch.Tensor
    grad: PyTree
    grad_norm: torch.Tensor
    offset: PyTree
    shifted: torch.Tensor
    num_syncs: torch.Tensor


def homotopy(
    family: str | Family | None = None,
    *,
    schedule: str | Sequence[float] = "linear",
    initial_step: float | None = None,
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
    scale: float | None = None,
    predictor: str = "tangent",
    tangent_rtol: float = 1e-6,
    tangent_max_iters: int | None = None,
    path: str | None = None,
) -> Transform:
    """Continuation from ``f_0`` to ``f_1 = f``; chain it first, e.g.
    ``chain(homotopy(), newton_krylov(), armijo())`` (see the module docstring).

    Args:
      family: ``"convex"``, ``"keller"`` or a callable ``family(params, t)``; ``None``
        (default): ``"keller"`` on the arclength path, ``"convex"`` on the minimizer path.
      schedule: how ``t`` advances: ``"linear"`` (``t + step``), ``"exponential"``
        (``1 - t`` times ``exp(-step)``, snapped to 1 below ``final_gap``) or a fixed
        increasing sequence of ``t`` values ending at 1 (no adaptation, no retries).
      initial_step: the first step (default 0.25 linear, 1.0 exponential).
      max_step: the largest step (default 1.0 linear, 8.0 exponential).
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
      scale: the convex family's ``scale`` (default ``|grad f(x0)| / max(|x0|, 1)``).
      predictor: ``"tangent"`` (Euler predictor) or ``"none"`` (warm start only).
      tangent_rtol, tangent_max_iters: the MINRES solve of the tangent.
      path: ``"minimizers"`` (the above) or ``"arclength"``: the pseudo-arclength follower
        :func:`~soo_func.continuation_arclength.arclength_homotopy` of ``family`` (built-in
        families, its own defaults; the options above are checked but do not apply).
        ``None`` (default): ``"arclength"`` when ``family`` is ``None``, else
        ``"minimizers"``. So ``homotopy()`` is Keller's curve by arclength, descending
        first (it solved more far starts than Newton alone, none fewer: see
        ``benchmarks/bench_homotopy.py``), and ``homotopy("convex")`` the former default.

    Needs the extras ``value``, ``grad``, ``value_fn``; returns ``grad f_t``.
    """
    if path is None:
        path = "arclength" if family is None else "minimizers"
    if path not in ("minimizers", "arclength"):
        raise ValueError(f"homotopy: path must be 'minimizers' or 'arclength', got {path!r}")
    if family is None:
        family = "keller" if path == "arclength" else "convex"
    linear = schedule == "linear"
    fixed = None if isinstance(schedule, str) else [float(s) for s in schedule]
    if initial_step is None:
        initial_step = 1.0 if schedule == "exponential" else 0.25
    if max_step is None:
        max_step = 8.0 if schedule == "exponential" else 1.0
    _check_homotopy_args(
        family,
        schedule,
        initial_step=initial_step,
        max_step=max_step,
        min_step=min_step,
        grow=grow,
        shrink=shrink,
        fast_steps=fast_steps,
        max_corrector_steps=max_corrector_steps,
        final_gap=final_gap,
        tangent_rtol=tangent_rtol,
        **({"corrector_rtol": corrector_rtol} if corrector_atol == 0 else {}),
        **({"scale": scale} if scale is not None else {}),
    )
    if corrector_atol < 0 or corrector_rtol < 0:
        raise ValueError("homotopy: corrector_rtol and corrector_atol must be >= 0")
    if predictor not in ("tangent", "none"):
        raise ValueError(f"homotopy: predictor must be 'tangent' or 'none', got {predictor!r}")
    if path == "arclength":
        return arclength_homotopy(family)
    builtin = not callable(family)
    convex_min_t = 0.1

    def init(params: PyTree) -> HomotopyState:
        ref = tree.leaves(params)[0]
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        count = torch.zeros((), dtype=torch.int64, device=ref.device)
        false = torch.zeros((), dtype=torch.bool, device=ref.device)
        zeros = tree.zeros_like(params)
        first_t = fixed[0] if fixed is not None else 0.0
        return HomotopyState(
            false, zero + first_t, zero, zero + initial_step, count, count, count, false, zero,
            zero, zeros, zeros, zeros, zero, zeros, zeros, zero, zeros, zero, zeros, false, count,
        )  # fmt: skip

    def family_at(base: Callable, state: HomotopyState, t) -> _ChargedObjective:
        fam = _family_fn(family, _raw(base), state)
        return _ChargedObjective(lambda p: fam(p, t), base)

    def objective_at(base, state, x, t, f_value=None, f_grad=None):
        """``f_t`` and its gradient at ``x`` (composed from ``f`` there when known)."""
        if builtin:
            if f_value is None:
                f_value, f_grad = value_and_grad(base)(x)
            return _compose(family, t, x, f_value, f_grad, state)
        return value_and_grad(family_at(base, state, t))(x)

    def start(state: HomotopyState, params, f_value, f_grad) -> HomotopyState:
        g0 = tree.norm(f_grad, math.inf)
        tol = corrector_rtol * g0
        if scale is not None:
            s = torch.full_like(state.scale, scale)
        else:
            s = tree.norm(f_grad) / torch.clamp(tree.norm(params), min=1.0)
        started = torch.ones_like(state.started)
        state = state._replace(
            started=started, tolerance=tol.to(state.t.dtype), scale=s.to(state.t.dtype),
            anchor=params, anchor_grad=f_grad,
        )  # fmt: skip
        return state

    def advance(t: float, step: float) -> float:
        if fixed is not None:
            return next((p for p in fixed if p > t + 1e-6), 1.0)
        if linear:
            new = t + step
        else:
            new = 1.0 - (1.0 - t) * math.exp(-step)
            if 1.0 - new <= final_gap:
                new = 1.0
        return 1.0 if new >= 1.0 - 1e-12 else new

    def predict(base, state, params, t_new: float, tangent):
        """Start point of the stage ``t_new``: the predictor, or the path point."""
        t = torch.full_like(state.t, t_new)
        point, value, grad = state.path_point, None, None
        syncs = 0
        if predictor == "tangent":
            x_pred = tree.axpy(t - state.t_path, tangent, state.path_point)
            v_pred, g_pred = objective_at(base, state, x_pred, t)
            if builtin:
                v_alt = _compose(
                    family, t, state.path_point, state.path_value, state.path_grad, state
                )[0]
            else:
                v_alt = family_at(base, state, t)(state.path_point)
            ok = torch.isfinite(v_pred) & torch.isfinite(tree.norm(g_pred)) & (v_pred <= v_alt)
            syncs += 1
            if bool(ok):
                point, value, grad = x_pred, v_pred, g_pred
        if value is None:
            known = (state.path_value, state.path_grad) if builtin else (None, None)
            value, grad = objective_at(base, state, state.path_point, t, *known)
        offset = tree.sub(point, params)
        return state._replace(
            t=t, value=value, grad=grad, offset=offset, shifted=torch.ones_like(state.shifted),
            corrector_steps=torch.ones_like(state.corrector_steps),
        ), syncs  # fmt: skip

    def update(updates, state: HomotopyState, params=None, **extra):
        del updates
        require_extras("homotopy", extra, "value", "grad", "value_fn")
        if params is None:
            raise TypeError("homotopy needs params in update(updates, state, params, ...)")
        base, f_value, f_grad = extra["value_fn"], extra["value"], extra["grad"]
        syncs = 1
        if not bool(state.started):
            state = start(state, params, f_value, f_grad)
        v_t, g_t = objective_at(base, state, params, state.t, f_value, f_grad)
        gnorm = tree.norm(g_t, math.inf)
        tol = state.tolerance
        if shrink_tolerance:  # the last stage, when retried, keeps the unshrunk tolerance
            tol = tol * torch.where(state.t < 1, 1 - state.t, torch.ones_like(state.t))
        tol = torch.clamp(tol, min=corrector_atol)
        flags = torch.stack([
            (gnorm <= tol).double(), state.t.double(), state.t_path.double(),
            state.step.double(), state.corrector_steps.double(), state.stage.double(),
            state.abandoned.double(),
        ]).tolist()  # fmt: skip
        syncs += 1
        converged, t, t_path, step, steps, stage, abandoned = flags
        state = state._replace(grad_norm=gnorm)
        plain = state._replace(
            value=v_t, grad=g_t, offset=tree.zeros_like(params),
            shifted=torch.zeros_like(state.shifted), corrector_steps=state.corrector_steps + 1,
        )  # fmt: skip
        if t >= 1.0 and (t_path >= 1.0 or abandoned or not retry_last_stage):
            new = plain  # past the last path point: the driver's gtol decides
        elif t >= 1.0 and converged:
            new = plain._replace(t_path=state.t, stage=state.stage + 1)
        elif converged:
            if fixed is None and stage >= 1 and steps <= fast_steps:
                step = min(step * grow, max_step)
            state = state._replace(
                t_path=state.t, path_point=params, path_value=f_value, path_grad=f_grad,
                stage=state.stage + 1, step=torch.full_like(state.step, step),
            )  # fmt: skip
            tangent = state.tangent
            if predictor == "tangent":
                fam = _ChargedObjective(_family_fn(family, _raw(base), state), base)
                tangent = path_tangent(fam, params, state.t, rtol=tangent_rtol,
                                       max_iters=tangent_max_iters)  # fmt: skip
            state = state._replace(tangent=tangent)
            new, more = predict(base, state, params, advance(t, step), tangent)
            syncs += more
        elif fixed is None and stage >= 1 and steps >= max_corrector_steps:
            step *= shrink
            state = state._replace(
                step=torch.full_like(state.step, step), num_retries=state.num_retries + 1
            )
            if step < min_step:
                one = torch.ones_like(state.t)
                v1, g1 = objective_at(base, state, params, one, f_value, f_grad)
                new = plain._replace(
                    t=one, value=v1, grad=g1, abandoned=torch.ones_like(state.abandoned),
                    step=state.step, num_retries=state.num_retries,
                    corrector_steps=torch.ones_like(state.corrector_steps),
                )  # fmt: skip
            else:
                new, more = predict(base, state, params, advance(t_path, step), state.tangent)
                syncs += more
        else:
            new = plain
        new = new._replace(num_syncs=new.num_syncs + syncs)
        return new.grad, new

    def publish(state: HomotopyState, params=None, **extra) -> dict[str, Any]:
        out = {
            "continuation_t": state.t,
            "continuation_t_path": state.t_path,
            "continuation_stage": state.stage,
            "continuation_step": state.step,
            "continuation_retries": state.num_retries,
            "continuation_grad_norm": state.grad_norm,
            "continuation_restart": state.corrector_steps == 1,
            "converged_ok": state.t >= 1,
        }
        base = extra.get("value_fn")
        if base is None or not bool(state.started):
            return out
        shifted, final = bool(state.shifted), bool(state.t >= 1)
        if final and not shifted:
            return out
        fam = _family_fn(family, _raw(base), state)
        t, offset = state.t, state.offset
        if shifted:
            rewritten = _ChargedObjective(lambda p: fam(tree.add(p, offset), t), base)
            out["params_offset"] = offset
        else:
            rewritten = _ChargedObjective(lambda p: fam(p, t), base)
        out.update(value_fn=rewritten, value=state.value, grad=state.grad)
        recover = _recovery(family, state, convex_min_t)
        if recover is not None:
            out["recover_objective"] = recover
        return out

    return Transform(init, update, publish)
