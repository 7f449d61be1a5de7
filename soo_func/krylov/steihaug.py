"""CG-Steihaug for the trust-region subproblem (Steihaug 1983; N&W Alg. 7.2)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from soo_func import tree
from soo_func.krylov._common import (
    KrylovResult,
    MatVec,
    PyTree,
    UnitScale,
    as_scalar,
    check_options,
    counter,
    first_leaf,
    iterate,
    safe_div,
    tolerance,
    total_size,
)

# --------------------------------------------------------------------------- Steihaug


class _SteihaugState(NamedTuple):
    z: PyTree
    r: PyTree
    d: PyTree
    rr: torch.Tensor
    done: torch.Tensor
    iters: torch.Tensor
    negative: torch.Tensor
    boundary: torch.Tensor


def _boundary_steps(z: PyTree, d: PyTree, radius: torch.Tensor):
    """The roots ``tau_minus <= 0 <= tau_plus`` of ``||z + tau d|| = radius`` (``||z|| <= radius``).

    Uses the cancellation-free form of the quadratic formula.
    """
    zd, dd, zz = tree.vdot(z, d), tree.sum_of_squares(d), tree.sum_of_squares(z)
    c = zz - radius**2
    disc = torch.sqrt(torch.clamp(zd**2 - dd * c, min=0))
    q = -(zd + torch.where(zd >= 0, disc, -disc))
    root_a = safe_div(q, dd)
    root_b = safe_div(c, q)
    return torch.minimum(root_a, root_b), torch.maximum(root_a, root_b)


def _warm_start(matvec: MatVec, grad: PyTree, x0: PyTree, radius: torch.Tensor, sync: bool):
    """``(z0, r0 = B z0 + grad, products)``: ``x0`` when it lies in the region and does not
    raise the model (``m(x0) <= m(0)``, finite), else ``(0, grad)``. One product, skipped
    (one host read) when ``sync`` and ``x0`` lies outside."""
    tree.check_same_structure(grad, x0, names=("grad", "x0"))
    inside = tree.norm(x0) <= radius
    if sync and tree.host_reads_allowed() and not bool(inside):
        return tree.zeros_like(grad), grad, 0
    bx = matvec(x0)
    change = tree.vdot(grad, x0) + 0.5 * tree.vdot(x0, bx)
    usable = torch.isfinite(change) & (change <= 0) & inside
    z = tree.where(usable, x0, tree.zeros_like(grad))
    return z, tree.where(usable, tree.add(bx, grad), grad), 1


def steihaug(
    matvec: MatVec,
    grad: PyTree,
    radius: float | torch.Tensor,
    *,
    max_iters: int | None = None,
    rtol: float | torch.Tensor = 1e-5,
    atol: float = 0.0,
    check_every: int | None = 1,
    x0: PyTree | None = None,
    x0_solves_model: bool = False,
) -> KrylovResult:
    """CG-Steihaug: approximately ``argmin_d <grad, d> + 0.5 <d, B d>`` s.t. ``||d|| <= radius``.

    Nocedal & Wright Alg. 7.2 with ``B = matvec``: CG on ``B d = -grad`` from
    ``z0 = 0`` (residual ``r = B z + grad``). On a direction with ``d^T B d <= 0`` (or
    not finite: an overflowing or NaN model) it returns the boundary point ``z + tau d``
    of smaller model value (both roots of ``||z + tau d|| = radius`` are tried); when a
    step would leave the region it stops at the boundary along it (``tau >= 0``);
    otherwise it stops at ``||r|| <= max(rtol ||grad||, atol)``. ``hit_boundary`` says
    the result lies on the sphere. The iterates grow in norm (Steihaug 1983), so the
    result stays inside. ``max_iters`` defaults to ``2 n``. ``radius`` must be positive
    and finite.

    ``x0`` (a warm start, e.g. an upstream direction's own solve of the same model)
    replaces ``z0 = 0`` when it lies in the region and lowers the model (one product,
    not made for an ``x0`` outside the region when
    ``check_every`` allows a host read); CG then continues from it (every step keeps the
    model decreasing, and one leaving the region stops on the boundary), and returns at
    once when its residual meets the tolerance. ``x0_solves_model``: ``x0`` is the
    caller's own inexact solve of the same model (an inexact Newton step to its own
    forcing term), accepted as it is: the tolerance becomes ``max(tol, ||B x0 + grad||)``.
    """
    check_options("steihaug", max_iters, rtol, atol, check_every)
    ref = first_leaf(grad)
    if not isinstance(radius, torch.Tensor) and not 0 < radius < float("inf"):
        raise ValueError(f"steihaug: radius must be positive and finite, got {radius}")
    radius = as_scalar(radius, ref)
    max_iters = 2 * total_size(grad) if max_iters is None else max_iters
    # The model divided by a power of two from the gradient, ``(g/s)^T d + 0.5 d^T (B/s) d``:
    # the same minimizer, the same iterates ``z`` bit for bit, and ``|g/s|^2`` far from
    # overflow (a float32 gradient of 2e25); ``r``, ``d`` and the model are in units of s.
    unit = UnitScale.of(grad)
    grad, matvec = unit.down(grad), _scaled(matvec, unit)
    tol = tolerance(tree.norm(grad), rtol, atol / unit.s)
    z, r, warm_products = tree.zeros_like(grad), grad, 0
    if x0 is not None:
        z, r, warm_products = _warm_start(matvec, grad, x0, radius, check_every is not None)
    rr = tree.sum_of_squares(r)
    if x0 is not None and x0_solves_model:
        tol = torch.where(tree.norm(z) > 0, torch.maximum(tol, torch.sqrt(rr)), tol)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    state = _SteihaugState(z, r, tree.neg(r), rr, torch.sqrt(rr) <= tol, counter(ref), false, false)

    def step(s: _SteihaugState) -> _SteihaugState:
        bd = matvec(s.d)
        dbd = tree.vdot(s.d, bd)
        # A non-finite d^T B d (an overflowing or NaN model) is taken as negative curvature:
        # the step goes to the boundary along the descent side of d, never to z + NaN d.
        negative = (dbd <= 0) | ~torch.isfinite(dbd)
        alpha = safe_div(s.rr, dbd)
        z_next = tree.axpy(alpha, s.d, s.z)
        outside = tree.norm(z_next) >= radius
        tau_minus, tau_plus = _boundary_steps(s.z, s.d, radius)
        # Model change along d from z: tau r^T d + 0.5 tau^2 d^T B d.
        rd = tree.vdot(s.r, s.d)
        m_minus = tau_minus * rd + 0.5 * tau_minus**2 * dbd
        m_plus = tau_plus * rd + 0.5 * tau_plus**2 * dbd
        tau_nc = torch.where(m_minus < m_plus, tau_minus, tau_plus)  # NaN model: tau_plus
        tau = torch.where(negative, tau_nc, tau_plus)
        hit = negative | outside
        z = tree.where(hit, tree.axpy(tau, s.d, s.z), z_next)
        r = tree.axpy(torch.where(hit, tau, alpha), bd, s.r)  # B z + grad at the new z
        rr = tree.sum_of_squares(r)
        d = tree.axpy(safe_div(rr, s.rr), s.d, tree.neg(r))
        converged = torch.sqrt(rr) <= tol
        return _SteihaugState(z, r, d, rr, hit | converged, s.iters + 1, s.negative | negative, hit)

    state, trips = iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=state.z,
        num_iters=state.iters,
        num_matvecs=counter(ref, trips + warm_products),
        residual_norm=torch.sqrt(state.rr) * unit.s,
        negative_curvature=state.negative,
        hit_boundary=state.boundary,
        model_change=0.5 * (tree.vdot(grad, state.z) + tree.vdot(state.z, state.r)) * unit.s,
    )


def _scaled(matvec: MatVec, unit: UnitScale) -> MatVec:
    """``v -> B v / s``."""

    def scaled_matvec(v: PyTree) -> PyTree:
        return unit.down(matvec(v))

    return scaled_matvec
