"""MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite systems."""

from __future__ import annotations

from typing import NamedTuple

import torch

from soo_func import tree
from soo_func.krylov._common import (
    KrylovResult,
    MatVec,
    PyTree,
    UnitScale,
    check_options,
    counter,
    first_leaf,
    initial_residual,
    iterate,
    safe_div,
    tolerance,
    total_size,
)

# --------------------------------------------------------------------------- MINRES


class _MinresState(NamedTuple):
    x: PyTree
    r1: PyTree
    r2: PyTree
    w: PyTree
    w2: PyTree
    beta: torch.Tensor
    oldb: torch.Tensor
    dbar: torch.Tensor
    epsln: torch.Tensor
    phibar: torch.Tensor
    cs: torch.Tensor
    sn: torch.Tensor
    done: torch.Tensor
    iters: torch.Tensor
    negative: torch.Tensor


def minres(
    matvec: MatVec,
    b: PyTree,
    x0: PyTree | None = None,
    *,
    max_iters: int | None = None,
    rtol: float | torch.Tensor = 1e-5,
    atol: float = 0.0,
    check_every: int | None = 1,
) -> KrylovResult:
    """MINRES for ``A x = b``, ``A`` symmetric, possibly indefinite (Paige & Saunders 1975).

    The Lanczos process ``beta_{k+1} v_{k+1} = A v_k - alpha_k v_k - beta_k v_{k-1}``
    builds a tridiagonal ``T_k``; Givens rotations keep its QR factorization, and
    ``x_k`` minimizes ``||b - A x||`` over ``x0 + K_k(A, r0)``, updated by three-term
    recurrences on the directions ``w``. ``residual_norm`` is the recurrence's
    ``phibar`` (equal to ``||b - A x_k||`` in exact arithmetic). One product per
    iteration; ``negative_curvature`` is set when a Lanczos vector has
    ``alpha_k = v^T A v <= 0``. ``max_iters`` defaults to ``2 n``.
    """
    check_options("minres", max_iters, rtol, atol, check_every)
    ref = first_leaf(b)
    max_iters = 2 * total_size(b) if max_iters is None else max_iters
    unit = UnitScale.of(b)
    b, x0 = unit.down(b), unit.down(x0)
    tol = tolerance(tree.norm(b), rtol, atol / unit.s)
    x, r, used = initial_residual(matvec, b, x0)
    beta1 = tree.norm(r)
    zero = torch.zeros_like(beta1)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    zeros = tree.zeros_like(b)
    state = _MinresState(
        x, r, r, zeros, zeros, beta1, zero, zero, zero, beta1, -torch.ones_like(beta1), zero,
        beta1 <= tol, counter(ref), false,
    )  # fmt: skip

    def step(s: _MinresState) -> _MinresState:
        v = tree.scale(safe_div(torch.ones_like(s.beta), s.beta), s.r2)
        y = tree.axpy(-safe_div(s.beta, s.oldb), s.r1, matvec(v))
        alpha = tree.vdot(v, y)
        y = tree.axpy(-safe_div(alpha, s.beta), s.r2, y)
        beta = tree.norm(y)
        # Apply the previous rotation, then make the new one (annihilates beta).
        delta = s.cs * s.dbar + s.sn * alpha
        gbar = s.sn * s.dbar - s.cs * alpha
        epsln = s.sn * beta
        dbar = -s.cs * beta
        # gamma = 0: T_k is singular and the Krylov space invariant (beta = 0), so b has a
        # part outside A's range. The least-squares iterate stays, and so does its residual.
        singular = torch.hypot(gbar, beta) == 0
        gamma = torch.clamp(torch.hypot(gbar, beta), min=torch.finfo(beta.dtype).tiny)
        cs = torch.where(singular, torch.zeros_like(gamma), gbar / gamma)
        sn = torch.where(singular, torch.ones_like(gamma), beta / gamma)
        phi = cs * s.phibar
        phibar = sn * s.phibar
        w = tree.scale(1 / gamma, tree.axpy(-delta, s.w, tree.axpy(-s.epsln, s.w2, v)))
        x = tree.where(singular, s.x, tree.axpy(phi, w, s.x))
        done = (phibar.abs() <= tol) | (beta == 0)
        return _MinresState(
            x, s.r2, y, w, s.w, beta, s.beta, dbar, epsln, phibar, cs, sn, done, s.iters + 1,
            s.negative | (alpha <= 0),
        )  # fmt: skip

    state, trips = iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=unit.up(state.x),
        num_iters=state.iters,
        num_matvecs=counter(ref, used + trips),
        residual_norm=state.phibar.abs() * unit.s,
        negative_curvature=state.negative,
        hit_boundary=false,
    )
