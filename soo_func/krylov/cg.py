"""Conjugate gradients (Hestenes & Stiefel 1952) and conjugate residual (Saad 2003, Alg. 6.20)."""

from __future__ import annotations

from collections.abc import Callable
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
    freeze,
    initial_residual,
    iterate,
    safe_div,
    tolerance,
    total_size,
)

# --------------------------------------------------------------------------- CG


class _CgState(NamedTuple):
    x: PyTree
    r: PyTree
    p: PyTree
    rr: torch.Tensor
    done: torch.Tensor
    iters: torch.Tensor
    negative: torch.Tensor


def cg(
    matvec: MatVec,
    b: PyTree,
    x0: PyTree | None = None,
    *,
    max_iters: int | None = None,
    rtol: float | torch.Tensor = 1e-5,
    atol: float = 0.0,
    check_every: int | None = 1,
    stop_on_negative_curvature: bool = False,
    on_iteration: Callable[[int, PyTree, PyTree], torch.Tensor] | None = None,
) -> KrylovResult:
    """Conjugate gradients for ``A x = b``, ``A`` symmetric positive definite (N&W Alg. 5.2).

    ``alpha = r^T r / p^T A p``, ``x += alpha p``, ``r -= alpha A p``,
    ``beta = r_new^T r_new / r^T r``, ``p = r_new + beta p``. One product per iteration
    (plus one for ``r0`` when ``x0`` is given). ``max_iters`` defaults to ``2 n``.
    A direction with ``p^T A p <= 0`` (or NaN) sets ``negative_curvature``; with
    ``stop_on_negative_curvature`` (truncated Newton-CG, N&W Alg. 7.1) the solver
    stops there and returns the iterate reached before it. ``p^T A p = 0`` always stops.

    ``on_iteration(k, x, r)``, when given, is called after iteration ``k`` (1-based, every
    one of the ``max_iters`` with ``check_every=None``) with the iterate and its residual
    (unchanged once the solver has stopped); a true 0-d result stops the solver there. It
    carries a caller's stopping rule or records iterates (Martens' CG backtracking).
    """
    check_options("cg", max_iters, rtol, atol, check_every)
    ref = first_leaf(b)
    max_iters = 2 * total_size(b) if max_iters is None else max_iters
    unit = UnitScale.of(b)
    b, x0 = unit.down(b), unit.down(x0)
    tol = tolerance(tree.norm(b), rtol, atol / unit.s)
    x, r, used = initial_residual(matvec, b, x0)
    rr = tree.sum_of_squares(r)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    state = _CgState(x, r, r, rr, torch.sqrt(rr) <= tol, counter(ref), false)

    def step(s: _CgState) -> _CgState:
        ap = matvec(s.p)
        pap = tree.vdot(s.p, ap)
        negative = ~(pap > 0)  # NaN curvature counts as negative: never stepped along
        alpha = safe_div(s.rr, pap)
        x = tree.axpy(alpha, s.p, s.x)
        r = tree.axpy(-alpha, ap, s.r)
        rr = tree.sum_of_squares(r)
        p = tree.axpy(safe_div(rr, s.rr), s.p, r)
        stop = pap == 0
        if stop_on_negative_curvature:
            stop = stop | negative
        new = _CgState(x, r, p, rr, torch.sqrt(rr) <= tol, s.iters + 1, s.negative | negative)
        kept = s._replace(done=torch.ones_like(s.done), negative=new.negative)
        return freeze(stop, kept, new)

    monitor = None
    if on_iteration is not None:

        def monitor(k: int, s: _CgState) -> torch.Tensor:
            return on_iteration(k, unit.up(s.x), unit.up(s.r))

    state, trips = iterate(step, state, max_iters, check_every, monitor)
    return KrylovResult(
        x=unit.up(state.x),
        num_iters=state.iters,
        num_matvecs=counter(ref, used + trips),
        residual_norm=torch.sqrt(state.rr) * unit.s,
        negative_curvature=state.negative,
        hit_boundary=false,
    )


# --------------------------------------------------------------------------- CR


class _CrState(NamedTuple):
    x: PyTree
    r: PyTree
    p: PyTree
    ar: PyTree
    ap: PyTree
    rar: torch.Tensor
    rr: torch.Tensor
    done: torch.Tensor
    iters: torch.Tensor
    negative: torch.Tensor


def cr(
    matvec: MatVec,
    b: PyTree,
    x0: PyTree | None = None,
    *,
    max_iters: int | None = None,
    rtol: float | torch.Tensor = 1e-5,
    atol: float = 0.0,
    check_every: int | None = 1,
    stop_on_negative_curvature: bool = False,
) -> KrylovResult:
    """Conjugate residual for ``A x = b``, ``A`` symmetric (Saad 2003, Alg. 6.20).

    ``alpha = r^T A r / (A p)^T (A p)``, ``x += alpha p``, ``r -= alpha A p``,
    ``beta = r_new^T A r_new / r^T A r``, ``p = r_new + beta p`` and
    ``A p = A r_new + beta A p``: the only product per iteration is ``A r_new``
    (plus ``A r0`` at the start, and ``A x0`` when ``x0`` is given). CR minimizes
    ``||r||`` over the Krylov space when ``A`` is positive definite and runs on
    symmetric indefinite systems too (it breaks down, and stops, if ``r^T A r = 0``).
    ``<p, A p> <= 0`` or ``<r, A r> <= 0`` sets ``negative_curvature`` (no extra product);
    with ``stop_on_negative_curvature`` the step along such a ``p`` is not taken
    (truncated Newton-CR, Dahito & Orban 2019). ``max_iters`` defaults to ``2 n``.
    """
    check_options("cr", max_iters, rtol, atol, check_every)
    ref = first_leaf(b)
    max_iters = 2 * total_size(b) if max_iters is None else max_iters
    unit = UnitScale.of(b)
    b, x0 = unit.down(b), unit.down(x0)
    tol = tolerance(tree.norm(b), rtol, atol / unit.s)
    x, r, used = initial_residual(matvec, b, x0)
    ar = matvec(r)
    used += 1
    # The operator's scale: ``(A / sigma) (sigma x) = b`` with sigma a power of two from
    # ``A r0``, so that ``|A p|^2`` stays far from overflow (a float32 Hessian of 2e25):
    # exact in binary floating point, the iterates are the unscaled ones bit for bit.
    op = UnitScale.of(ar)

    def scaled_matvec(v: PyTree) -> PyTree:
        return op.down(matvec(v))

    x, ar = op.up(x), op.down(ar)
    rar = tree.vdot(r, ar)
    rr = tree.sum_of_squares(r)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    state = _CrState(x, r, r, ar, ar, rar, rr, torch.sqrt(rr) <= tol, counter(ref), rar <= 0)

    def step(s: _CrState) -> _CrState:
        negative = (tree.vdot(s.p, s.ap) <= 0) | (s.rar <= 0)
        alpha = safe_div(s.rar, tree.sum_of_squares(s.ap))
        x = tree.axpy(alpha, s.p, s.x)
        r = tree.axpy(-alpha, s.ap, s.r)
        ar = scaled_matvec(r)
        rar = tree.vdot(r, ar)
        beta = safe_div(rar, s.rar)
        p = tree.axpy(beta, s.p, r)
        ap = tree.axpy(beta, s.ap, ar)
        rr = tree.sum_of_squares(r)
        converged = torch.sqrt(rr) <= tol
        new = _CrState(x, r, p, ar, ap, rar, rr, converged, s.iters + 1, s.negative | negative)
        new = new._replace(done=converged | (rar == 0))
        stop = s.rar == 0
        if stop_on_negative_curvature:
            stop = stop | negative
        kept = s._replace(done=torch.ones_like(s.done), negative=new.negative)
        return freeze(stop, kept, new)

    state, trips = iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=unit.up(op.down(state.x)),
        num_iters=state.iters,
        num_matvecs=counter(ref, used + trips),
        residual_norm=torch.sqrt(state.rr) * unit.s,
        negative_curvature=state.negative,
        hit_boundary=false,
    )
