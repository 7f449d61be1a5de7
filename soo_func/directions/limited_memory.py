"""The limited-memory quasi-Newton transform: L-BFGS, and BFGS, DFP, SR1, Broyden in
compact form.

The transform behind ``lbfgs(m)``, ``bfgs(memory_size=m)``, ``dfp(...)``, ``sr1(...)`` and
``broyden(...)``. The ``m`` newest pairs live in a
:class:`~soo_func.directions.pair_memory.PairMemory`; the matrices are those of
:mod:`soo_func.directions.compact`, with ``H0 = gamma I``, ``gamma = s^T y / y^T y`` of the
newest pair with positive curvature (N&W eq. 7.20), or a fixed ``initial_scaling``.

``form="inverse"`` applies ``H``: ``d = -(gamma g + [S Y] c)``, with the coefficients ``c``
from the two-loop recursion for BFGS (N&W Alg. 7.4, the L-BFGS kernel) and from the compact
inverse formula (Byrd, Nocedal & Schnabel 1994) for the others. ``form="direct"`` keeps the
compact ``B`` and solves ``B d = -g`` matrix-free with one ``2m x 2m`` dense solve
(:func:`~soo_func.directions.compact.kernel_solve`). All publish ``curvature``: ``v -> B v``
by the compact direct formula, and ``step_hint``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.directions import pair_memory as pm
from soo_func.directions.compact import (
    KERNELS,
    kernel_operator,
    newest_gamma,
    two_loop_coefficients,
)

__all__ = ["LimitedMemoryState", "curvature_rule", "first_step_hint", "limited_memory"]


class LimitedMemoryState(NamedTuple):
    """The pair memory, the last point (to form the next pair), ``gamma`` (``H0 = gamma I``)
    of the last update, the step-length hint for the search, and (SR1, Broyden) whether
    ``gamma`` has been fixed by a first usable pair.

    For L-BFGS (BFGS, inverse form) the memory's Gram matrix holds only what the two-loop
    recursion reads (``triu(S^T Y)``, ``Y^T Y``); the inner products of older pairs with
    each new ``s`` are not computed (zeros; see :func:`~soo_func.directions.pair_memory.push`).
    """

    memory: pm.PairMemory
    last: pm.LastPoint
    gamma: torch.Tensor
    step_hint: torch.Tensor
    scaled: torch.Tensor


def first_step_hint(
    grad: torch.Tensor, gg: torch.Tensor, empty: torch.Tensor, order: float
) -> torch.Tensor:
    """``min(1, 1 / |g|_order)`` while the memory is ``empty`` (and ``g != 0``), else 1."""
    if order == 2:
        inverse = torch.rsqrt(gg)
    else:
        inverse = 1.0 / torch.linalg.vector_norm(grad, ord=order).to(gg.dtype)
    first = torch.clamp(inverse, max=1.0)
    return torch.where(empty & (gg > 0), first, torch.ones_like(first))


def _sr1_rule(gram, valid, kernel_fn, identity_coef, rtol, a_col, b_col):
    """N&W eq. 6.26, ``|a^T (b - M a)| > rtol |a| |b - M a|``, for the new pair (last slot)
    against the matrix ``M`` of the retained pairs: ``(a, b) = (s, y)`` with ``M = B``, or the
    dual ``(y, s)`` with ``M = H`` (the denominator of the inverse update)."""
    old = torch.cat([valid[:-1], torch.zeros_like(valid[-1:])])
    both = torch.cat([old, old])
    keep = both[:, None] & both[None, :]
    old_gram = torch.where(keep, gram, torch.zeros_like(gram))
    kernel = kernel_fn(old_gram, old, identity_coef)
    zero = torch.zeros_like(gram[:, 0])
    w_a = torch.where(both, gram[:, a_col], zero)  # [S Y]^T a
    w_b = torch.where(both, gram[:, b_col], zero)
    z = kernel @ w_a  # M a = identity_coef a + [S Y] z
    aa, ab, bb = gram[a_col, a_col], gram[a_col, b_col], gram[b_col, b_col]
    a_ma = identity_coef * aa + w_a @ z
    b_ma = identity_coef * ab + w_b @ z
    ma_ma = identity_coef * identity_coef * aa + 2 * identity_coef * (w_a @ z) + z @ (old_gram @ z)
    residual_sq = torch.clamp(bb - 2 * b_ma + ma_ma, min=0)
    return torch.abs(ab - a_ma) > rtol * torch.sqrt(aa * residual_sq)


def curvature_rule(curvature_eps: float | None) -> pm.AcceptRule:
    """The BFGS/DFP skip rule: keep the new pair when ``s^T y > eps |s| |y|``."""

    def accept_rule(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        del valid
        m = gram.shape[0] // 2
        ss, sy, yy = gram[m - 1, m - 1], gram[m - 1, -1], gram[-1, -1]
        eps = torch.finfo(gram.dtype).eps if curvature_eps is None else curvature_eps
        return sy > eps * torch.sqrt(ss * yy)

    return accept_rule


class _Options(NamedTuple):
    """The choices of :func:`limited_memory` (validated by the public constructors)."""

    method: str
    memory_size: int
    form: str = "inverse"
    curvature_eps: float | None = None
    initial_scaling: float | None = None
    sr1_rtol: float | None = None
    reset_on_ascent: bool = True
    first_step_norm: float = 2


def limited_memory(
    method: str,
    memory_size: int,
    form: str = "inverse",
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
    sr1_rtol: float | None = None,
    reset_on_ascent: bool = True,
    first_step_norm: float = 2,
    who: str | None = None,
) -> Transform:
    """The limited-memory ``method`` direction (``"bfgs"``, ``"dfp"``, ``"sr1"``, ``"broyden"``).

    Use the public constructors (``lbfgs(m)``, ``bfgs(memory_size=m, form=...)``, ...); see
    :mod:`soo_func.directions.quasi_newton` and :func:`~soo_func.directions.lbfgs.lbfgs`
    for the arguments. ``bfgs(memory_size=m)`` is ``lbfgs(m, first_step_norm=2)``.
    """
    who = who or f"{method}(memory_size={memory_size})"
    pm.check_memory_size(who, memory_size)
    if method not in KERNELS:
        raise ValueError(f"unknown quasi-Newton method {method!r}; use one of {sorted(KERNELS)}")
    if form not in ("inverse", "direct"):
        raise ValueError(f"{who}: form must be 'inverse' or 'direct', got {form!r}")
    if first_step_norm not in (1, 2, math.inf):
        raise ValueError(
            f"{who}: first_step_norm must be 1, 2 or math.inf, got {first_step_norm!r}"
        )
    options = _Options(
        method,
        memory_size,
        form,
        curvature_eps,
        initial_scaling,
        sr1_rtol,
        reset_on_ascent,
        first_step_norm,
    )
    return _transform(options, who)


def _transform(o: _Options, who: str) -> Transform:
    direct_kernel, inverse_kernel = KERNELS[o.method]
    m = o.memory_size
    sticky = o.method in ("sr1", "broyden")
    two_loop = o.method == "bfgs" and o.form == "inverse"
    full_gram = not two_loop  # the two-loop recursion does not read S^T s (see pm.push)
    fixed = o.initial_scaling is not None

    def sticky_gamma(state: LimitedMemoryState, point: pm.Pair):
        """SR1/Broyden: ``gamma`` of the first usable pair, then kept (as N&W eq. 6.20).

        Rescaling by the newest pair, as L-BFGS does, makes the newest SR1 pair's
        denominator ``y^T (s - gamma y)`` vanish and the compact middle matrix singular."""
        s, y = point[0] - state.last.point[0], point[1] - state.last.point[1]
        sy, yy = (s @ y).to(state.gamma.dtype), (y @ y).to(state.gamma.dtype)
        usable = state.last.has_prev & (sy > 0) & (yy > 0) & torch.isfinite(sy)
        fresh = torch.where(usable, sy / torch.where(usable, yy, torch.ones_like(yy)), 1.0)
        return torch.where(state.scaled, state.gamma, fresh), state.scaled | usable

    def make_rule(gamma_sr1: torch.Tensor | None) -> pm.AcceptRule:
        if o.method in ("bfgs", "dfp"):
            return curvature_rule(o.curvature_eps)

        def accept_rule(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            ss = gram[m - 1, m - 1]
            if o.method == "broyden":
                return ss > 0
            s_col, y_col = m - 1, 2 * m - 1
            rtol = torch.finfo(gram.dtype).eps ** 0.5 if o.sr1_rtol is None else o.sr1_rtol
            direct = _sr1_rule(gram, valid, direct_kernel, 1.0 / gamma_sr1, rtol, s_col, y_col)
            dual = _sr1_rule(gram, valid, inverse_kernel, gamma_sr1, rtol, y_col, s_col)
            return (ss > 0) & direct & dual

        return accept_rule

    def coefficients(memory: pm.PairMemory, sg, yg, gamma) -> torch.Tensor:
        """``c`` with ``d = -(gamma g + [S Y] c)``: ``H g`` (inverse) or ``B^{-1} g`` (direct)."""
        if two_loop:
            return two_loop_coefficients(memory.gram, memory.valid, sg, yg, gamma)
        projected = torch.cat([sg, yg])
        if o.form == "inverse":
            return inverse_kernel(memory.gram, memory.valid, gamma) @ projected
        sigma = 1.0 / gamma
        kernel = direct_kernel(memory.gram, memory.valid, sigma)
        eye = torch.eye(2 * m, dtype=gamma.dtype, device=gamma.device)
        lhs = sigma * eye + kernel @ memory.gram
        return torch.linalg.solve_ex(lhs, -(kernel @ projected) / sigma)[0]

    def init(params: Any) -> LimitedMemoryState:
        memory, last, one = pm.init_for(params, m)
        return LimitedMemoryState(
            memory=memory,
            last=last,
            gamma=one,
            step_hint=one,
            scaled=torch.full((), fixed, device=one.device),
        )

    def flat_update(updates, state: LimitedMemoryState, params):
        """The direction as a flat vector, the flat ``(x, g)`` it was formed at, the state."""
        if params is None:
            raise TypeError(f"{who} needs params in update(updates, state, params) to form s")
        point = pm.flat_point(params, updates)
        scaled = state.scaled
        if fixed:
            gamma = torch.full_like(state.gamma, o.initial_scaling)
        elif sticky:
            gamma, scaled = sticky_gamma(state, point)
        rule = make_rule(gamma if sticky else None)
        memory, last, sg, yg, gg = pm.push(state.memory, state.last, point, rule, full_gram)
        if not fixed and not sticky:
            gamma = newest_gamma(memory.gram, memory.valid)
        coef = coefficients(memory, sg, yg, gamma)
        slope = -(gamma * gg + sg @ coef[:m] + yg @ coef[m:])  # g^T d, d = -(gamma g + [S Y] c)
        finite = torch.isfinite(slope)
        descent = finite & (slope < 0)
        keep = descent if o.reset_on_ascent else finite
        memory = memory._replace(valid=memory.valid & keep)
        direction_gamma = torch.where(descent, gamma, torch.ones_like(gamma))
        coef = torch.where(descent, coef, torch.zeros_like(coef))
        direction = pm.combine(memory, point[1], -direction_gamma, -coef)
        hint = first_step_hint(point[1], gg, ~memory.valid.any(), o.first_step_norm)
        new_state = LimitedMemoryState(
            memory=memory,
            last=last,
            gamma=torch.where(keep, gamma, torch.ones_like(gamma)),
            step_hint=hint,
            scaled=scaled & (keep | torch.full_like(scaled, fixed)),
        )
        return direction, point, new_state

    def update(updates, state: LimitedMemoryState, params=None, **extra):
        del extra
        direction, _, new_state = flat_update(updates, state, params)
        return tree.unravel(direction, params), new_state

    def update_and_publish(updates, state: LimitedMemoryState, params=None, **extra):
        """``update`` and ``publish``, with the step's flat vectors (``flat_step``) too."""
        direction, (x, g), new_state = flat_update(updates, state, params)
        unraveled = tree.unravel(direction, params)
        flat = tree.FlatStep(params, updates, unraveled, x, g, direction)
        return unraveled, new_state, {**publish(new_state, params, **extra), "flat_step": flat}

    def publish(state: LimitedMemoryState, params=None, **extra) -> dict[str, Any]:
        del extra
        memory, sigma = state.memory, 1.0 / state.gamma

        def kernel() -> torch.Tensor:
            # Built on the first product only, so publishing costs nothing unused; the
            # two-loop's memory completes its Gram matrix here (S^T s was skipped).
            gram = memory.gram if full_gram else pm.complete_gram(memory)
            return direct_kernel(gram, memory.valid, sigma)

        operator = kernel_operator(memory, kernel, sigma, params)
        return {"curvature": operator, "step_hint": state.step_hint}

    return guarded(who, Transform(init, update, publish, update_and_publish), LimitedMemoryState)
