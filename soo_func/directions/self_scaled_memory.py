"""Limited-memory self-scaled BFGS: ``ssbfgs(memory_size=m)``.

The SSBFGS inverse update of :mod:`soo_func.directions.self_scaled` (``phi = 1``),
``H+ = (1/tau) [H - H y y^T H / y^T H y + (y^T H y) v v^T] + s s^T / s^T y``, is, with
``rho = 1 / s^T y`` and ``V = I - rho y s^T`` (expand ``V^T H V``: it is the bracket),

    H+ = (1/tau) V^T H V + rho s s^T,

the BFGS update (N&W eq. 6.17) of the scaled matrix ``H / tau``. Unrolled over the pairs
``0..k-1`` from ``H0 = gamma I``, with ``c_j = 1/tau_j``,

    H_k = W V^T...V H0 V...V + sum_i w_i V_{>i}^T rho_i s_i s_i^T V_{>i},
    w_i = prod_{j>i} c_j,   W = prod_j c_j,

(each term is scaled by every later update; ``V_{>i} = V_{i+1} ... V_{k-1}``). The two-loop
recursion (N&W Alg. 7.4) evaluates it with one change: its second loop, run on
``r~_i = (prod_{j>=i} c_j) r_i``, becomes ``r~_{i+1} = r~_i + s_i (w_i alpha_i - beta_i)``,
``beta_i = rho_i y_i^T r~_i``, from ``r~_0 = W gamma q``
(:func:`~soo_func.directions.compact.two_loop_coefficients` with ``weights=w`` and
``gamma -> W gamma``). The memory keeps the ``m`` newest pairs and their ``c_j``: the
direction is the dense SSBFGS direction of those ``m`` updates from ``H0``, exactly the dense
:func:`~soo_func.directions.self_scaled.ssbfgs` direction while the memory has not wrapped.

The same matrix is ``W`` times plain BFGS of the pairs ``(s_i / Q_i, y_i)``,
``Q_i = prod_{j<=i} c_j`` (``BFGS(c H; s, y) = c BFGS(H; s / c, y)``, by the same expansion),
which gives its inverse by the compact direct formula (Byrd, Nocedal & Schnabel 1994, eq.
2.17) on the rescaled Gram matrix: the published ``curvature``, ``B = (1/W) B_plain``.

``tau`` needs Al-Baali's ``b = s^T B s / s^T y`` of the matrix that made the last direction
``d = -H g_prev`` (Urbán et al. eq. (11); the papers' ``b = -alpha s^T g_prev / s^T y``). With
``s = alpha d``: ``s^T g_prev = alpha d^T g_prev`` and ``s^T B s = alpha^2 d^T B d``,
``d^T B d = -g_prev^T d``, so

    s^T B s = (s^T g_prev)^2 / (-g_prev^T d),    s^T g_prev = s^T g - s^T y,

from the products the pair memory takes anyway and one stored scalar (``-g^T d`` of the
last direction): no solve and no stored direction. After a reset (direction ``-g``) the
scalar is ``|g|^2 / h0``, the curvature of the restarted ``H0 = h0 I``, as the dense form
keeps it. The matrix that made ``d`` still held the pair that the new one pushes out of a
full memory; ``b`` is read from it (the only one at hand without a solve). A step not along
``d`` (a trust region) gives an estimate of ``b``, as in the dense form.

SSBroyden (``phi != 1``) is not a two-loop recursion, and its ``tau`` needs ``y^T H y`` (a
second pass over the memory); it is offered dense only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.directions import pair_memory as pm
from soo_func.directions.compact import (
    bfgs_direct_kernel,
    kernel_operator,
    newest_gamma,
    two_loop_coefficients,
)
from soo_func.directions.limited_memory import curvature_rule, first_step_hint

__all__ = [
    "SelfScaledMemoryState",
    "limited_memory_ssbfgs",
    "pair_weights",
    "ssbfgs_tau",
]


class SelfScaledMemoryState(NamedTuple):
    """The pair memory and last point (as :class:`~soo_func.directions.limited_memory.
    LimitedMemoryState`), ``gamma`` (``H0 = gamma I`` before the weights), ``inv_tau``
    (``[m]``: ``1/tau_j`` of each slot's update, 1 for invalid slots), ``direction_curvature``
    (0-d: ``d^T B d = -g^T d`` of the last direction) and ``step_hint``."""

    memory: pm.PairMemory
    last: pm.LastPoint
    gamma: torch.Tensor
    inv_tau: torch.Tensor
    direction_curvature: torch.Tensor
    step_hint: torch.Tensor


def ssbfgs_tau(b: torch.Tensor, scaling: str) -> torch.Tensor:
    """SSBFGS's ``tau`` from Al-Baali's ``b`` (``b > 0``): ``min(1, 1/b)`` (``"al-baali"``,
    Urbán et al. eq. (11)), ``1/b`` (``"oren-luenberger"``, Oren & Luenberger 1974) or 1
    (``"none"``, BFGS)."""
    if scaling == "al-baali":
        return torch.clamp(1 / b, max=1.0)
    if scaling == "oren-luenberger":
        return 1 / b
    return torch.ones_like(b)


def pair_weights(inv_tau: torch.Tensor, valid: torch.Tensor):
    """``(w, W)``: ``w_i = prod_{j>i} c_j`` (``[m]``) and ``W = prod_j c_j`` over the valid
    slots' ``c_j = 1/tau_j`` (module docstring; invalid slots count as 1)."""
    c = torch.where(valid, inv_tau, torch.ones_like(inv_tau))
    later = torch.cat([c[1:], torch.ones_like(c[:1])])  # c_{i+1}, and 1 for the newest
    w = torch.flip(torch.cumprod(torch.flip(later, [0]), 0), [0])
    return w, w[0] * c[0]


def _new_inv_tau(state: SelfScaledMemoryState, pushed: pm.Pushed, scaling: str):
    """``1/tau`` of the pair just pushed (1 where ``b`` is not positive and finite: the
    unscaled BFGS update, as the dense form)."""
    m = state.inv_tau.shape[0]
    gram = pushed.memory.gram
    sy, sg = gram[m - 1, 2 * m - 1], pushed.sg[-1]  # zero when the pair was rejected
    s_gprev = sg - sy  # s^T g_prev
    curvature = state.direction_curvature
    sbs = s_gprev * s_gprev / torch.where(curvature > 0, curvature, 1.0)
    b = sbs / torch.where(sy > 0, sy, 1.0)
    usable = (curvature > 0) & (sy > 0) & (b > 0) & torch.isfinite(b)
    tau = ssbfgs_tau(torch.where(usable, b, 1.0), scaling)
    return torch.where(usable, 1 / tau, 1.0)


def limited_memory_ssbfgs(
    memory_size: int,
    scaling: str,
    initial_scaling: float | None,
    curvature_eps: float | None,
    who: str,
) -> Transform:
    """The transform behind ``ssbfgs(memory_size=m)`` (module docstring; arguments
    validated by :func:`~soo_func.directions.self_scaled.ssbfgs`)."""
    pm.check_memory_size(who, memory_size)
    m = memory_size
    fixed = initial_scaling is not None
    h0 = 1.0 if initial_scaling is None else initial_scaling
    rule = curvature_rule(curvature_eps)

    def init(params: Any) -> SelfScaledMemoryState:
        memory, last, one = pm.init_for(params, m)
        return SelfScaledMemoryState(
            memory=memory,
            last=last,
            gamma=one * h0,
            inv_tau=torch.ones(m, dtype=one.dtype, device=one.device),
            direction_curvature=torch.zeros_like(one),
            step_hint=one,
        )

    def update(updates, state: SelfScaledMemoryState, params=None, **extra):
        del extra
        if params is None:
            raise TypeError(f"{who} needs params in update(updates, state, params) to form s")
        point = pm.flat_point(params, updates)
        pushed = pm.push(state.memory, state.last, point, rule, full_gram=False)
        memory, sg, yg, gg = pushed.memory, pushed.sg, pushed.yg, pushed.gg
        inv_tau = torch.cat([state.inv_tau[1:], _new_inv_tau(state, pushed, scaling)[None]])
        if fixed:
            gamma = torch.full_like(state.gamma, h0)
        else:
            gamma = newest_gamma(memory.gram, memory.valid)
        weights, total = pair_weights(inv_tau, memory.valid)
        identity = total * gamma  # H0's coefficient, W gamma
        coef = two_loop_coefficients(memory.gram, memory.valid, sg, yg, identity, weights)
        slope = -(identity * gg + sg @ coef[:m] + yg @ coef[m:])  # g^T d
        descent = torch.isfinite(slope) & (slope < 0)
        memory = memory._replace(valid=memory.valid & descent)
        identity = torch.where(descent, identity, torch.ones_like(identity))
        coef = torch.where(descent, coef, torch.zeros_like(coef))
        direction = pm.combine(memory, point[1], -identity, -coef)
        new_state = SelfScaledMemoryState(
            memory=memory,
            last=pushed.last,
            gamma=torch.where(descent, gamma, torch.full_like(gamma, h0)),
            inv_tau=torch.where(memory.valid, inv_tau, torch.ones_like(inv_tau)),
            direction_curvature=torch.where(descent, -slope, gg / h0),
            step_hint=first_step_hint(point[1], gg, ~memory.valid.any(), 2),
        )
        return tree.unravel(direction, params), new_state

    def publish(state: SelfScaledMemoryState, params=None, **extra) -> dict[str, Any]:
        del extra
        memory = state.memory
        c = torch.where(memory.valid, state.inv_tau, torch.ones_like(state.inv_tau))
        prefix = torch.cumprod(c, 0)  # Q_i = prod_{j<=i} c_j; W = Q_{m-1}
        total = prefix[-1]
        sigma = 1.0 / state.gamma

        def kernel() -> torch.Tensor:
            # B = (1/W) B_plain of the pairs (s_i / Q_i, y_i): the compact direct BFGS
            # kernel on the rescaled Gram matrix (built on the first product only).
            scale = torch.cat([1.0 / prefix, torch.ones_like(prefix)])
            gram = pm.complete_gram(memory) * scale[:, None] * scale[None, :]
            plain = bfgs_direct_kernel(gram, memory.valid, sigma)
            return plain * scale[:, None] * scale[None, :] / total

        operator = kernel_operator(memory, kernel, sigma / total, params)
        return {"curvature": operator, "step_hint": state.step_hint}

    return guarded(who, Transform(init, update, publish), SelfScaledMemoryState)
