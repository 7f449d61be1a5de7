"""Pseudo-arclength path following of a gradient homotopy: :func:`arclength_homotopy`.

The zero curve of ``H(x, t) = 0`` is followed in ``z = (x, c t)`` (``c = max(|x0|, 1)``,
so that ``t`` and ``x`` share a unit) by its arclength, with ``t`` an unknown: the
curve may pass turning points (folds), where ``t`` decreases, and cross ``t = 1`` more
than once (Allgower & Georg, *Introduction to Numerical Continuation Methods*, 2003,
ch. 2-3). Families (on the gradient equation of ``f``):

``"keller"``
    ``H = grad f(x) - (1 - t) grad f(x0)`` (Keller 1978, "Global homotopies and Newton
    methods"; Branin 1972): the gradient stays parallel to ``grad f(x0)`` along the
    curve, which passes through several stationary points of ``f`` at ``t = 1``
    (Branin's method), minimizers and saddles.
``"convex"``
    ``H = t grad f(x) + (1 - t) s (x - x0)``, ``s = |grad f(x0)| / max(|x0|, 1)``
    (the fixed-point homotopy of probability-one methods, Chow, Mallet-Paret & Yorke 1978).

With ``descend_first`` (default) the chain first minimizes ``f`` from ``x0`` on its own;
the point it reaches is the first candidate minimizer, and the curve from ``x0`` then
looks for better ones (Branin's use of the curve; it also means the homotopy ends no
worse than the plain chain whenever the latter converges within ``max_descent_steps``).

One update is one predictor-corrector step (Allgower & Georg Algorithm 3.1.1): the Euler
predictor ``z + h tau`` along the unit tangent ``tau`` (the null vector of
``J = [H_x  H_t]``, oriented as the previous one: ``tau`` is the previous tangent
projected on the null space of ``J``) and the pseudo-arclength Newton corrector
``z <- z + u``, ``J u = -H(z)``, ``u`` orthogonal to ``tau`` (Allgower & Georg section
2.3 / 3.3; Keller 1977). Both are minimum-norm solves of ``K u = b``: dense (``J`` from
``n`` Hessian-vector products, pseudo-inverse; the default for ``n <= 50``) or
matrix-free, MINRES on the symmetric saddle-point system ``[[s I, K^T], [K, 0]]``
(two Hessian-vector products per iteration). The step ``h`` halves (a retry in the same
update) when the corrector's first step exceeds ``h / 2`` or stops contracting by half,
and doubles after a corrector that converged within three iterations.

Where the curve crosses ``t = 1`` the point is refined by Newton at ``t = 1`` (on
``grad f = 0``) and tested with Lanczos (the smallest Ritz value of ``n`` steps): a
minimizer (positive semidefinite Hessian) is a candidate, a saddle is passed and the
curve followed on (Branin). After ``max_minimizers`` candidates, ``max_path_steps``
steps, or a step below ``min_step``, the point jumps to the candidate of least ``f``
(to ``x0`` when there is none: the plain chain as without a homotopy) and the chained
optimizer minimizes ``f`` from there; the driver's ``gtol`` decides. While on the curve
the point is handed downstream as ``params_offset`` with the objective
``p -> f_t(p + offset)`` (see :mod:`soo_func.continuation`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, require_extras
from soo_func.continuation_curve import Curve, family_value, ritz_extremes
from soo_func.continuation_path import _ChargedObjective, _raw
from soo_func.oracles import hvp, value_and_grad

PyTree = Any

__all__ = ["ArclengthState", "arclength_homotopy"]

_DENSE_MAX_SIZE = 50


class ArclengthState(NamedTuple):
    """State of :func:`arclength_homotopy` (0-d tensors on the params' device).

    ``point``/``t`` is the last point on the curve, ``tangent``/``tangent_t`` its unit
    tangent in ``z = (x, c t)``; ``best``/``best_value`` the candidate minimizer of least
    ``f``; ``value``/``grad``/``offset`` the objective handed downstream last.
    """

    started: torch.Tensor
    descending: torch.Tensor
    descent_steps: torch.Tensor
    finished: torch.Tensor
    anchor: PyTree
    anchor_grad: PyTree
    scale: torch.Tensor
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
    value: torch.Tensor
    grad: PyTree
    offset: PyTree
    shifted: torch.Tensor
    num_syncs: torch.Tensor


def arclength_homotopy(
    family: str = "keller",
    *,
    initial_step: float = 0.1,
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
      initial_step, max_step, min_step: arclength steps, in units of ``c = max(|x0|, 1)``.
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
        solves), ``"minres"`` (matrix-free) or ``"auto"`` (dense for ``n <= 50``: MINRES
        loses the curve on badly scaled problems, e.g. Freudenstein-Roth from 100x).

    Needs the extras ``value``, ``grad``, ``value_fn``.
    """
    if family not in ("keller", "convex"):
        raise ValueError(
            f"arclength_homotopy: family must be 'keller' or 'convex', got {family!r} "
            "(user families: use homotopy(family) with its minimizer path)"
        )
    numbers = dict(initial_step=initial_step, max_step=max_step, min_step=min_step,
                   corrector_tol=corrector_tol, krylov_rtol=krylov_rtol,
                   descent_gtol=descent_gtol)  # fmt: skip
    for name, value in numbers.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"arclength_homotopy: {name} must be positive and finite, got {value!r}"
            )
    if solver not in ("auto", "dense", "minres"):
        raise ValueError(
            f"arclength_homotopy: solver must be 'auto', 'dense' or 'minres', got {solver!r}"
        )
    if not min_step <= initial_step <= max_step:
        raise ValueError("arclength_homotopy: need min_step <= initial_step <= max_step")
    for name, value in dict(max_path_steps=max_path_steps, max_minimizers=max_minimizers,
                            max_corrector_iters=max_corrector_iters,
                            max_descent_steps=max_descent_steps).items():  # fmt: skip
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"arclength_homotopy: {name} must be an integer >= 1, got {value!r}")

    def init(params: PyTree) -> ArclengthState:
        ref = tree.leaves(params)[0]
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        count = torch.zeros((), dtype=torch.int64, device=ref.device)
        false = torch.zeros((), dtype=torch.bool, device=ref.device)
        zeros = tree.zeros_like(params)
        return ArclengthState(
            false, false | descend_first, count, false, zeros, zeros, zero, zero, zeros, zero, zeros, zero, zero, count, count,
            count, count, zeros, zero + math.inf, zero, zeros, zeros, false, count,
        )  # fmt: skip

    def start(state: ArclengthState, params, f_grad) -> ArclengthState:
        c = torch.clamp(tree.norm(params), min=1.0).to(state.t.dtype)
        s = (tree.norm(f_grad) / c).to(state.t.dtype)
        s = torch.where(s > 0, s, torch.ones_like(s))
        state = state._replace(
            started=torch.ones_like(state.started), anchor=params, anchor_grad=f_grad,
            scale=s, t_unit=c, point=params, step=initial_step * c,
        )  # fmt: skip
        return state

    def corrector(curve: Curve, x, w, tau_x, tau_w, h: float):
        """Predict ``z + h tau`` and correct; ``(x, w, grad)`` or ``None`` (rejected)."""
        c = float(curve.c)
        x, w = tree.axpy(h, tau_x, x), w + h * tau_w
        previous = None
        for k in range(max_corrector_iters):
            value, grad, h_val = curve.residual(x, w / c)
            u_x, u_w = curve.min_norm(x, w / c, grad, tree.zeros_like(x), torch.zeros_like(w),
                                      tree.neg(h_val), normal=(tau_x, tau_w))  # fmt: skip
            size, z_size = torch.stack([
                torch.sqrt(tree.sum_of_squares(u_x) + u_w**2),
                torch.sqrt(tree.sum_of_squares(x) + w**2) + value * 0,  # NaN if f is not finite
            ]).tolist()  # fmt: skip
            if not (math.isfinite(size) and math.isfinite(z_size)):
                return None, k + 1
            x, w = tree.add(x, u_x), w + u_w
            if (k == 0 and size > 0.5 * h) or (previous is not None and size > 0.5 * previous):
                return None, k + 1
            previous = size
            if size <= curve.tol * (1 + z_size):
                value, grad, _ = curve.residual(x, w / c)
                return (x, w, value, grad), k + 1
        return None, max_corrector_iters

    def at_t_one(curve: Curve, x_old, w_old, x_new, w_new):
        """Newton on ``grad f = 0`` from the interpolated crossing; ``(x, f, minimizer)``."""
        c = float(curve.c)
        a = (c - w_old) / (w_new - w_old)
        x = tree.add(x_old, tree.scale(a, tree.sub(x_new, x_old)))
        one = torch.ones_like(w_old)
        for _ in range(5):
            _, grad, h_val = curve.residual(x, one)
            dx = curve.solve_x(x, one, grad, tree.neg(h_val))
            x = tree.add(x, dx)
            if float(tree.norm(dx)) <= curve.tol * (1 + float(tree.norm(x))):
                break
        value = value_and_grad(curve.base)(x)[0]
        n = sum(leaf.numel() for leaf in tree.leaves(x))
        gen = torch.Generator().manual_seed(0)
        probe = tree.map(lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64)
                         .to(p), x)  # fmt: skip
        low, high = ritz_extremes(lambda v: hvp(curve.base, x, v), probe, min(n, 100))
        eps = torch.finfo(value.dtype).eps
        return x, value, low >= -math.sqrt(eps) * max(abs(high), 1e-300)

    def path_step(state: ArclengthState, base, params) -> tuple[ArclengthState, int]:
        eps = torch.finfo(state.t.dtype).eps  # float32: tolerances at its rounding
        curve = Curve(family, base, state, max(krylov_rtol, 10 * eps), krylov_max_iters)
        curve.tol = max(corrector_tol, 100 * eps)
        size = sum(leaf.numel() for leaf in tree.leaves(params))
        curve.dense = solver == "dense" or (solver == "auto" and size <= _DENSE_MAX_SIZE)
        c = float(curve.c)
        x, w = state.point, state.t * curve.c
        syncs = 0
        if int(state.num_path_steps) == 0:
            _, grad, _ = curve.residual(x, state.t)
            e_w = torch.ones_like(w)
            tau_x, tau_w = curve.tangent(x, state.t, grad, tree.zeros_like(x), e_w)
            state = state._replace(tangent=tau_x, tangent_t=tau_w)
        h = float(state.step)
        rejections = 0
        while True:
            accepted, iters = corrector(curve, x, w, state.tangent, state.tangent_t, h)
            syncs += iters
            if accepted is not None:
                break
            h *= 0.5
            rejections += 1
            if h < min_step * c:
                return finish(state._replace(num_rejections=state.num_rejections + rejections),
                              params), syncs  # fmt: skip
        x_new, w_new, f_new, grad = accepted
        if iters <= 3:
            h = min(2 * h, max_step * c)
        tau_x, tau_w = curve.tangent(x_new, w_new / c, grad, state.tangent, state.tangent_t)
        state = state._replace(
            point=x_new, t=w_new / curve.c, tangent=tau_x, tangent_t=tau_w,
            step=torch.full_like(state.step, h), num_path_steps=state.num_path_steps + 1,
            num_rejections=state.num_rejections + rejections,
        )  # fmt: skip
        crossed = (float(w) - c) * (float(w_new) - c) <= 0 and float(w) != c
        if crossed:
            syncs += 1
            x_one, value, minimizer = at_t_one(curve, x, w, x_new, w_new)
            state = state._replace(num_crossings=state.num_crossings + 1)
            if minimizer and math.isfinite(float(value)):
                better = bool(value < state.best_value)
                state = state._replace(
                    num_minimizers=state.num_minimizers + 1,
                    best=x_one if better else state.best,
                    best_value=torch.minimum(value, state.best_value),
                )  # fmt: skip
        done = int(state.num_minimizers) >= max_minimizers
        if done or int(state.num_path_steps) >= max_path_steps:
            return finish(state, params), syncs
        t = state.t
        v_t, g_t = family_value(family, base, state, x_new, t, (f_new, grad))
        return state._replace(
            value=v_t, grad=g_t, offset=tree.sub(x_new, params),
            shifted=torch.ones_like(state.shifted),
        ), syncs  # fmt: skip

    def finish(state: ArclengthState, params) -> ArclengthState:
        found = bool(torch.isfinite(state.best_value))
        target = state.best if found else state.anchor
        return state._replace(
            finished=torch.ones_like(state.finished), offset=tree.sub(target, params),
            shifted=torch.ones_like(state.shifted), t=torch.ones_like(state.t),
        )  # fmt: skip

    def descend(state: ArclengthState, params, f_value, f_grad) -> ArclengthState:
        """One step of the plain chain; at its end the point becomes the first candidate."""
        small = tree.norm(f_grad, math.inf) <= descent_gtol
        if not bool(small | (state.descent_steps >= max_descent_steps)):
            return state._replace(descent_steps=state.descent_steps + 1)
        finite = torch.isfinite(f_value)
        return state._replace(
            descending=torch.zeros_like(state.descending), best=params,
            best_value=torch.where(finite, f_value, state.best_value),
        )  # fmt: skip

    def update(updates, state: ArclengthState, params=None, **extra):
        del updates
        require_extras("arclength_homotopy", extra, "value", "grad", "value_fn")
        if params is None:
            raise TypeError(
                "arclength_homotopy needs params in update(updates, state, params, ...)"
            )
        base, f_value, f_grad = extra["value_fn"], extra["value"], extra["grad"]
        syncs = 1
        if not bool(state.started):
            state = start(state, params, f_grad)
        if bool(state.descending):
            state, syncs = descend(state, params, f_value, f_grad), syncs + 1
        if bool(state.descending) or bool(state.finished):
            new = state._replace(value=f_value, grad=f_grad, offset=tree.zeros_like(params),
                                 shifted=torch.zeros_like(state.shifted))  # fmt: skip
        else:
            new, more = path_step(state, base, params)
            syncs += more
            if bool(new.finished):  # the objective f seen from the target point
                target = tree.add(params, new.offset)
                value, grad = value_and_grad(base)(target)
                new = new._replace(value=value, grad=grad)
        new = new._replace(num_syncs=new.num_syncs + syncs)
        return new.grad, new

    def publish(state: ArclengthState, params=None, **extra) -> dict[str, Any]:
        out = {
            "continuation_t": state.t,
            "continuation_path_steps": state.num_path_steps,
            "continuation_rejections": state.num_rejections,
            "continuation_crossings": state.num_crossings,
            "continuation_minimizers": state.num_minimizers,
            "continuation_descent_steps": state.descent_steps,
            "continuation_restart": state.shifted,
            "converged_ok": state.finished,
            # The best minimizer found so far (inf before the first): a run stopped while
            # the point is on the curve returns it (see soo_func.minimize).
            "incumbent_params": state.best,
            "incumbent_value": state.best_value,
        }
        base = extra.get("value_fn")
        if base is None or not bool(state.started) or not bool(state.shifted):
            return out
        offset, t = state.offset, state.t
        raw = _raw(base)
        if bool(state.finished):
            fn = _ChargedObjective(lambda p: raw(tree.add(p, offset)), base)
        else:
            fn = _ChargedObjective(
                lambda p: family_value(family, raw, state, tree.add(p, offset), t)[0], base
            )
        out.update(value_fn=fn, value=state.value, grad=state.grad, params_offset=offset)
        return out

    return Transform(init, update, publish)
