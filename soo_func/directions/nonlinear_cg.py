"""Nonlinear conjugate gradient directions: ``d_k = -g_k + beta_k d_{k-1}``.

With ``y = g_k - g_{k-1}`` and ``d = d_{k-1}`` (Nocedal & Wright section 5.2; the
survey of Hager & Zhang, "A survey of nonlinear conjugate gradient methods", 2006):

=========================  ==============================================================
``"fletcher_reeves"``      ``|g_k|^2 / |g_{k-1}|^2``                        (N&W eq. 5.41a)
``"polak_ribiere"``        ``g_k^T y / |g_{k-1}|^2``                        (N&W eq. 5.44)
``"polak_ribiere_plus"``   ``max(0, PR)``                                   (N&W eq. 5.45)
``"hestenes_stiefel"``     ``g_k^T y / d^T y``                              (N&W eq. 5.46)
``"dai_yuan"``             ``|g_k|^2 / d^T y``                              (Dai & Yuan 1999)
``"hager_zhang"``          ``max(beta_N, eta_k)``, ``beta_N = (y - 2 d |y|^2 / d^T y)^T g_k / d^T y``,
                           ``eta_k = -1 / (|d| min(0.01, |g_{k-1}|))``       (Hager & Zhang 2005)
``"hs_dy"``                ``max(0, min(HS, DY))``                          (Dai & Yuan 2001)
=========================  ==============================================================

Restarts (``beta = 0``, so ``d = -g``): every ``restart_every`` steps (default: the
number of parameters ``n``), and when successive gradients are far from orthogonal,
``|g_k^T g_{k-1}| >= restart_threshold |g_k|^2`` (Powell 1977; N&W eq. 5.52, threshold
0.2). A direction that is not a descent direction (``g^T d >= 0``, or not finite) is
replaced by ``-g``. Everything is ``torch.where`` on 0-d tensors: no host syncs.

The transform publishes ``step_hint``, a step-length hint for the line search:
``alpha_{k-1} g_{k-1}^T d_{k-1} / g_k^T d_k`` (N&W eq. 3.60; ``alpha_{k-1} d_{k-1}`` is
read off as ``params_k - params_{k-1}``), ``1 / |g_0|`` at the first step, capped at
``max_step_hint``. Use it with ``wolfe(c2=0.1)`` (N&W recommend ``c2 = 0.1`` for CG).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.options import check_in, check_int_at_least, check_positive

PyTree = Any

__all__ = ["BETAS", "NonlinearCgState", "nonlinear_cg"]

BETAS = (
    "fletcher_reeves",
    "polak_ribiere",
    "polak_ribiere_plus",
    "hestenes_stiefel",
    "dai_yuan",
    "hager_zhang",
    "hs_dy",
)


class NonlinearCgState(NamedTuple):
    """State of :func:`nonlinear_cg`: the previous gradient, direction and params, the
    step count, steps since the last restart, whether the last step restarted, the last
    ``beta`` and the published step hint."""

    prev_grad: PyTree
    prev_direction: PyTree
    prev_params: PyTree
    count: torch.Tensor
    since_restart: torch.Tensor
    restarted: torch.Tensor
    beta: torch.Tensor
    step_hint: torch.Tensor


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, NaN where ``den == 0`` (caught by the descent guard)."""
    return num / den


def _beta(kind: str, g: PyTree, g_prev: PyTree, d_prev: PyTree) -> torch.Tensor:
    """``beta_k`` of the chosen formula (see the module docstring)."""
    y = tree.sub(g, g_prev)
    gg = tree.sum_of_squares(g)
    gg_prev = tree.sum_of_squares(g_prev)
    gy = tree.vdot(g, y)
    dy = tree.vdot(d_prev, y)
    if kind == "fletcher_reeves":
        return _div(gg, gg_prev)
    if kind == "polak_ribiere":
        return _div(gy, gg_prev)
    if kind == "polak_ribiere_plus":
        return torch.clamp(_div(gy, gg_prev), min=0)
    if kind == "hestenes_stiefel":
        return _div(gy, dy)
    if kind == "dai_yuan":
        return _div(gg, dy)
    if kind == "hs_dy":
        return torch.clamp(torch.minimum(_div(gy, dy), _div(gg, dy)), min=0)
    # hager_zhang
    yy = tree.sum_of_squares(y)
    beta_n = _div(gy - 2 * yy * _div(tree.vdot(d_prev, g), dy), dy)
    floor = -1 / (tree.norm(d_prev) * torch.clamp(torch.sqrt(gg_prev), max=0.01))
    return torch.maximum(beta_n, floor)


def nonlinear_cg(
    beta: str = "polak_ribiere_plus",
    *,
    restart_every: int | None = None,
    restart_threshold: float = 0.2,
    max_step_hint: float = float("inf"),
) -> Transform:
    """Nonlinear CG direction ``d_k = -g_k + beta_k d_{k-1}`` (N&W Algorithm 5.4 and section 5.2).

    Args:
      beta: one of :data:`BETAS` (see the module docstring for the formulas).
      restart_every: restart with ``-g`` every this many steps (default: ``n``, the
        number of parameters).
      restart_threshold: Powell's test ``|g_k^T g_{k-1}| >= restart_threshold |g_k|^2``
        restarts; ``float('inf')`` disables it.
      max_step_hint: cap on the published ``step_hint``.

    Uses the ``grad`` extra when given (else the incoming updates) and ``params``
    (for the step hint). Publishes ``step_hint``, ``cg_beta`` and ``cg_restarted``.
    """
    check_in("nonlinear_cg", "beta", beta, BETAS)
    if restart_every is not None:
        check_int_at_least("nonlinear_cg", "restart_every", restart_every, 1)
    check_positive("nonlinear_cg", "restart_threshold", restart_threshold, allow_inf=True)
    check_positive("nonlinear_cg", "max_step_hint", max_step_hint, allow_inf=True)

    def init(params: PyTree) -> NonlinearCgState:
        ref = tree.leaves(params)[0]
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        count = torch.zeros((), dtype=torch.int64, device=ref.device)
        zeros = tree.zeros_like(params)
        true = torch.ones((), dtype=torch.bool, device=ref.device)
        return NonlinearCgState(zeros, zeros, params, count, count, true, zero, zero)

    def update(updates: PyTree, state: NonlinearCgState, params: PyTree = None, **extra: Any):
        grad = extra.get("grad")
        grad = updates if grad is None else grad
        params = state.prev_params if params is None else params
        period = restart_every or sum(leaf.numel() for leaf in tree.leaves(grad))
        gg = tree.sum_of_squares(grad)
        powell = tree.vdot(grad, state.prev_grad).abs() >= restart_threshold * gg
        restart = (state.count == 0) | (state.since_restart >= period) | powell
        b = torch.where(restart, torch.zeros_like(gg), _beta(beta, grad, state.prev_grad,
                                                             state.prev_direction))  # fmt: skip
        direction = tree.axpy(b, state.prev_direction, tree.neg(grad))
        slope = tree.vdot(grad, direction)
        not_descent = ~(slope < 0)
        direction = tree.where(not_descent, tree.neg(grad), direction)
        slope = torch.where(not_descent, -gg, slope)
        restarted = restart | not_descent
        # N&W eq. 3.60: alpha_{k-1} g_{k-1}^T d_{k-1} = g_{k-1}^T (params_k - params_{k-1}).
        previous_decrease = tree.vdot(state.prev_grad, tree.sub(params, state.prev_params))
        first = torch.where(gg > 0, torch.rsqrt(gg), torch.ones_like(gg))
        hint = torch.where(state.count == 0, first, previous_decrease / slope)
        hint = torch.where(torch.isfinite(hint) & (hint > 0), hint, first)
        new_state = NonlinearCgState(
            prev_grad=grad,
            prev_direction=direction,
            prev_params=params,
            count=state.count + 1,
            since_restart=torch.where(
                restarted, torch.ones_like(state.count), state.since_restart + 1
            ),
            restarted=restarted,
            beta=torch.where(not_descent, torch.zeros_like(b), b),
            step_hint=torch.clamp(hint, max=max_step_hint),
        )
        return direction, new_state

    def publish(state: NonlinearCgState, params: PyTree = None, **extra: Any) -> dict:
        del params, extra
        return {
            "step_hint": state.step_hint,
            "cg_beta": state.beta,
            "cg_restarted": state.restarted,
        }

    return guarded(
        "nonlinear_cg", Transform(init, update, publish), NonlinearCgState,
        like=lambda state: state.prev_params,
    )  # fmt: skip
