"""Limited-memory BFGS, DFP, SR1 and Broyden by compact representations.

The transform behind ``bfgs(memory_size=m)``, ``dfp(...)``, ``sr1(...)`` and
``broyden(...)``. The ``m`` newest pairs live in a
:class:`~soo_func.directions.pair_memory.PairMemory`; the matrices are the compact
formulas of Byrd, Nocedal & Schnabel (1994) in :mod:`soo_func.directions.compact`,
with ``H0 = gamma I``, ``gamma = s^T y / y^T y`` of the newest pair with positive
curvature (N&W eq. 7.20), or a fixed ``initial_scaling``.

``form="inverse"`` applies the compact ``H``: ``d = -(gamma g + [S Y] F_H [S^T g; Y^T g])``.
``form="direct"`` keeps the compact ``B`` and solves ``B d = -g`` matrix-free with one
``2m x 2m`` dense solve (:func:`~soo_func.directions.compact.kernel_solve`). Both
publish ``curvature``: ``v -> B v`` by the compact direct formula.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform
from soo_func.directions import pair_memory as pm
from soo_func.directions.compact import KERNELS, kernel_operator

__all__ = ["LimitedMemoryState", "limited_memory"]


class LimitedMemoryState(NamedTuple):
    """The pair memory, ``gamma`` (``H0 = gamma I``) of the last update, a step hint, and
    (SR1, Broyden) whether ``gamma`` has been fixed by a first usable pair."""

    memory: pm.PairMemory
    gamma: torch.Tensor
    initial_step: torch.Tensor
    scaled: torch.Tensor


def _newest_positive_gamma(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``s^T y / y^T y`` of the newest valid pair with ``s^T y > 0``, else 1."""
    m = valid.shape[0]
    sy, yy = torch.diagonal(gram[:m, m:]), torch.diagonal(gram[m:, m:])
    usable = valid & (sy > 0) & (yy > 0)
    ratio = sy / torch.where(usable, yy, torch.ones_like(yy))
    order = torch.arange(1, m + 1, device=valid.device) * usable
    newest = torch.argmax(order)
    return torch.where(usable.any(), ratio[newest], torch.ones_like(ratio[0]))


def _sr1_rule(gram, valid, kernel_fn, scale, rtol, a_col, b_col):
    """N&W eq. 6.26, ``|a^T (b - M a)| >= rtol |a| |b - M a|``, for the new pair (last slot)
    against the matrix ``M`` of the retained pairs: ``(a, b) = (s, y)`` with ``M = B``, or the
    dual ``(y, s)`` with ``M = H`` (the denominator of the inverse update)."""
    old = torch.cat([valid[:-1], torch.zeros_like(valid[-1:])])
    both = torch.cat([old, old])
    keep = both[:, None] & both[None, :]
    old_gram = torch.where(keep, gram, torch.zeros_like(gram))
    kernel = kernel_fn(old_gram, old, scale)
    zero = torch.zeros_like(gram[:, 0])
    w_a = torch.where(both, gram[:, a_col], zero)  # [S Y]^T a
    w_b = torch.where(both, gram[:, b_col], zero)
    z = kernel @ w_a  # M a = scale a + [S Y] z
    aa, ab, bb = gram[a_col, a_col], gram[a_col, b_col], gram[b_col, b_col]
    a_ma = scale * aa + w_a @ z
    b_ma = scale * ab + w_b @ z
    ma_ma = scale * scale * aa + 2 * scale * (w_a @ z) + z @ (old_gram @ z)
    residual_sq = torch.clamp(bb - 2 * b_ma + ma_ma, min=0)
    return torch.abs(ab - a_ma) >= rtol * torch.sqrt(aa * residual_sq)


def limited_memory(
    method: str,
    memory_size: int,
    form: str = "inverse",
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
    sr1_rtol: float | None = None,
    reset_on_ascent: bool = True,
) -> Transform:
    """The limited-memory ``method`` direction (``"bfgs"``, ``"dfp"``, ``"sr1"``, ``"broyden"``).

    Use the public constructors (``bfgs(memory_size=m, form=...)``, ...); see
    :mod:`soo_func.directions.quasi_newton` for the arguments.
    """
    who = f"{method}(memory_size={memory_size})"
    pm.check_memory_size(who, memory_size)
    if method not in KERNELS:
        raise ValueError(f"unknown quasi-Newton method {method!r}; use one of {sorted(KERNELS)}")
    if form not in ("inverse", "direct"):
        raise ValueError(f"{who}: form must be 'inverse' or 'direct', got {form!r}")
    direct_kernel, inverse_kernel = KERNELS[method]
    m = memory_size
    sticky = method in ("sr1", "broyden")

    def sticky_gamma(state: LimitedMemoryState, point: torch.Tensor):
        """SR1/Broyden: ``gamma`` of the first usable pair, then kept (as N&W eq. 6.20).

        Rescaling by the newest pair, as L-BFGS does, makes the newest SR1 pair's
        denominator ``y^T (s - gamma y)`` vanish and the compact middle matrix singular."""
        s, y = point - state.memory.prev_point
        sy, yy = (s @ y).to(state.gamma.dtype), (y @ y).to(state.gamma.dtype)
        usable = state.memory.has_prev & (sy > 0) & (yy > 0) & torch.isfinite(sy)
        fresh = torch.where(usable, sy / torch.where(usable, yy, torch.ones_like(yy)), 1.0)
        return torch.where(state.scaled, state.gamma, fresh), state.scaled | usable

    def make_rule(gamma_sr1: torch.Tensor):
        def accept_rule(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            ss, sy, yy = gram[m - 1, m - 1], gram[m - 1, -1], gram[-1, -1]
            eps = torch.finfo(gram.dtype).eps if curvature_eps is None else curvature_eps
            if method in ("bfgs", "dfp"):
                return sy > eps * torch.sqrt(ss * yy)
            if method == "broyden":
                return ss > 0
            s_col, y_col = m - 1, 2 * m - 1
            sigma = 1.0 / gamma_sr1
            rtol = torch.finfo(gram.dtype).eps ** 0.5 if sr1_rtol is None else sr1_rtol
            direct = _sr1_rule(gram, valid, direct_kernel, sigma, rtol, s_col, y_col)
            dual = _sr1_rule(gram, valid, inverse_kernel, gamma_sr1, rtol, y_col, s_col)
            return (ss > 0) & direct & dual

        return accept_rule

    def init(params: Any) -> LimitedMemoryState:
        leaves = tree.leaves(params)
        n = sum(leaf.numel() for leaf in leaves)
        dtype, device = leaves[0].dtype, leaves[0].device
        one = torch.ones((), dtype=pm.compute_dtype(dtype), device=device)
        scaled = torch.full((), initial_scaling is not None, device=device)
        return LimitedMemoryState(pm.init_memory(m, n, dtype, device), one, one, scaled)

    def update(updates, state: LimitedMemoryState, params=None, **extra):
        del extra
        if params is None:
            raise TypeError(f"{who} needs params in update(updates, state, params) to form s")
        point = pm.flat_point(params, updates)
        scaled = state.scaled
        if initial_scaling is not None:
            gamma = torch.full_like(state.gamma, initial_scaling)
        elif sticky:
            gamma, scaled = sticky_gamma(state, point)
        memory, sg, yg, gg = pm.push(state.memory, point, make_rule(gamma if sticky else None))
        if initial_scaling is None and not sticky:
            gamma = _newest_positive_gamma(memory.gram, memory.valid)
        projected = torch.cat([sg, yg])
        if form == "inverse":
            coef = inverse_kernel(memory.gram, memory.valid, gamma) @ projected
            scale = gamma
        else:
            sigma = 1.0 / gamma
            kernel = direct_kernel(memory.gram, memory.valid, sigma)
            eye = torch.eye(2 * m, dtype=gamma.dtype, device=gamma.device)
            lhs = sigma * eye + kernel @ memory.gram
            coef = torch.linalg.solve_ex(lhs, -(kernel @ projected) / sigma)[0]
            scale = gamma
        slope = -(scale * gg + projected @ coef)  # g^T d for d = -(scale g + [S Y] coef)
        finite = torch.isfinite(slope)
        descent = finite & (slope < 0)
        keep = descent if reset_on_ascent else finite
        memory = memory._replace(valid=memory.valid & keep)
        kept_scale = torch.where(keep, scale, torch.ones_like(scale))
        direction_scale = torch.where(descent, scale, torch.ones_like(scale))
        coef = torch.where(descent, coef, torch.zeros_like(coef))
        direction = pm.combine(memory, point[1], -direction_scale, -coef)
        first = torch.clamp(torch.rsqrt(gg), max=1.0)
        empty = ~memory.valid.any()
        hint = torch.where(empty & (gg > 0), first, torch.ones_like(first))
        scaled = scaled & (keep | torch.full_like(scaled, initial_scaling is not None))
        new_state = LimitedMemoryState(memory, kept_scale, hint, scaled)
        return tree.unravel(direction, params), new_state

    def publish(state: LimitedMemoryState, params=None, **extra) -> dict[str, Any]:
        del extra
        memory, sigma = state.memory, 1.0 / state.gamma

        def kernel() -> torch.Tensor:
            return direct_kernel(memory.gram, memory.valid, sigma)

        operator = kernel_operator(memory, kernel, sigma, params)
        return {"curvature": operator, "step_hint": state.initial_step}

    return Transform(init, update, publish)
