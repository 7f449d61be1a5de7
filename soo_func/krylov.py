"""Krylov solvers on pytrees: CG, conjugate residual, MINRES and Steihaug-CG.

Every solver takes ``matvec`` (a pytree -> pytree linear operator ``A``, assumed
symmetric) and returns a :class:`KrylovResult`. Convergence is
``||r|| <= max(rtol * ||b||, atol)`` with ``r = b - A x``.

Host synchronisation
--------------------
The iteration is written without data-dependent Python control flow: every
iteration computes a candidate state and keeps the old one where the solver has
already stopped (``torch.where`` on a 0-d ``done`` flag), so a stopped solver is
*frozen*, never corrupted by the 0/0 of a converged recurrence. Whether to leave the
loop early is the only host decision, taken every ``check_every`` iterations
(``bool(done)``, one device sync each time):

* ``check_every=1`` (the default of the functions here): one sync per iteration,
  as scipy does; no wasted operator applications.
* ``check_every=None``: never sync; the loop always runs ``max_iters`` iterations
  and frozen iterations still pay one operator application and a few ``where``
  ops each. This is what a direction's ``update`` uses to stay sync-free (bound
  ``max_iters`` there).

``num_iters`` counts the iterations that changed the state; ``num_matvecs`` counts
every operator application made, frozen ones included (it is the cost paid).
Negative curvature (a direction ``p`` with ``<p, A p> <= 0``, or for MINRES a
Lanczos vector with ``<v, A v> <= 0``) is always reported in the result; CG and CR
stop there (without taking the step) only when ``stop_on_negative_curvature=True``.

References: Hestenes & Stiefel (1952) / Nocedal & Wright (2006) Alg. 5.2 (CG);
Saad (2003) Alg. 6.20 (conjugate residual); Paige & Saunders (1975) (MINRES);
Steihaug (1983) / Nocedal & Wright Alg. 7.2 (CG-Steihaug).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from soo_func import tree

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = ["KrylovResult", "cg", "cr", "minres", "steihaug"]


class KrylovResult(NamedTuple):
    """What a Krylov solver returns (all scalars are 0-d tensors on ``b``'s device)."""

    x: PyTree
    num_iters: torch.Tensor
    num_matvecs: torch.Tensor
    residual_norm: torch.Tensor
    negative_curvature: torch.Tensor
    hit_boundary: torch.Tensor


# --------------------------------------------------------------------------- helpers


def _like(value: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


def _ref(b: PyTree) -> torch.Tensor:
    leaves = tree.leaves(b)
    if not leaves:
        raise ValueError("the right-hand side is an empty pytree")
    tree.check_tensor_leaves(b, "b")
    return leaves[0]


def _size(b: PyTree) -> int:
    return sum(leaf.numel() for leaf in tree.leaves(b))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (the result is then never used)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1, den))


def _freeze(done: torch.Tensor, old: Any, new: Any) -> Any:
    """``old`` where ``done`` else ``new``, for every tensor of two like-shaped states."""
    return optree.tree_map(lambda a, b: torch.where(done, a, b), old, new)


def _check_options(who: str, max_iters, rtol, atol, check_every) -> None:
    if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 0):
        raise ValueError(f"{who}: max_iters must be a non-negative int or None, got {max_iters!r}")
    # A tensor rtol (a forcing term computed on the device) is not checked: no host sync.
    if (not isinstance(rtol, torch.Tensor) and rtol < 0) or atol < 0:
        raise ValueError(f"{who}: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(
            f"{who}: check_every must be a positive int (sync every that many iterations) or "
            f"None (never sync), got {check_every!r}"
        )


def _tolerance(b_norm: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    return torch.clamp(rtol * b_norm, min=atol)


def _iterate(
    step: Callable[[Any], Any], state: Any, max_iters: int, check_every: int | None
) -> tuple[Any, int]:
    """Run ``step`` up to ``max_iters`` times, freezing the state once ``state.done``.

    Returns the final state and the number of ``step`` calls (operator applications).
    """
    trips = 0
    for k in range(max_iters):
        if check_every is not None and k % check_every == 0 and bool(state.done):
            break
        state = _freeze(state.done, state, step(state))
        trips += 1
    return state, trips


def _counter(ref: torch.Tensor, value: int = 0) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=ref.device)


def _start(matvec: MatVec, b: PyTree, x0: PyTree | None) -> tuple[PyTree, PyTree, int]:
    """``(x0, r0 = b - A x0, matvecs used)``; no product when ``x0`` is ``None``."""
    if x0 is None:
        return tree.zeros_like(b), b, 0
    tree.check_same_structure(b, x0, names=("b", "x0"))
    return x0, tree.sub(b, matvec(x0)), 1


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
) -> KrylovResult:
    """Conjugate gradients for ``A x = b``, ``A`` symmetric positive definite (N&W Alg. 5.2).

    ``alpha = r^T r / p^T A p``, ``x += alpha p``, ``r -= alpha A p``,
    ``beta = r_new^T r_new / r^T r``, ``p = r_new + beta p``. One product per iteration
    (plus one for ``r0`` when ``x0`` is given). ``max_iters`` defaults to ``2 n``.
    A direction with ``p^T A p <= 0`` sets ``negative_curvature``; with
    ``stop_on_negative_curvature`` (truncated Newton-CG, N&W Alg. 7.1) the solver
    stops there and returns the iterate reached before it. ``p^T A p = 0`` always stops.
    """
    _check_options("cg", max_iters, rtol, atol, check_every)
    ref = _ref(b)
    max_iters = 2 * _size(b) if max_iters is None else max_iters
    tol = _tolerance(tree.norm(b), rtol, atol)
    x, r, used = _start(matvec, b, x0)
    rr = tree.sum_of_squares(r)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    state = _CgState(x, r, r, rr, torch.sqrt(rr) <= tol, _counter(ref), false)

    def step(s: _CgState) -> _CgState:
        ap = matvec(s.p)
        pap = tree.vdot(s.p, ap)
        negative = pap <= 0
        alpha = _safe_div(s.rr, pap)
        x = tree.axpy(alpha, s.p, s.x)
        r = tree.axpy(-alpha, ap, s.r)
        rr = tree.sum_of_squares(r)
        p = tree.axpy(_safe_div(rr, s.rr), s.p, r)
        stop = pap == 0
        if stop_on_negative_curvature:
            stop = stop | negative
        new = _CgState(x, r, p, rr, torch.sqrt(rr) <= tol, s.iters + 1, s.negative | negative)
        kept = s._replace(done=torch.ones_like(s.done), negative=new.negative)
        return _freeze(stop, kept, new)

    state, trips = _iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=state.x,
        num_iters=state.iters,
        num_matvecs=_counter(ref, used + trips),
        residual_norm=torch.sqrt(state.rr),
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
    _check_options("cr", max_iters, rtol, atol, check_every)
    ref = _ref(b)
    max_iters = 2 * _size(b) if max_iters is None else max_iters
    tol = _tolerance(tree.norm(b), rtol, atol)
    x, r, used = _start(matvec, b, x0)
    ar = matvec(r)
    used += 1
    rar = tree.vdot(r, ar)
    rr = tree.sum_of_squares(r)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    state = _CrState(x, r, r, ar, ar, rar, rr, torch.sqrt(rr) <= tol, _counter(ref), rar <= 0)

    def step(s: _CrState) -> _CrState:
        negative = (tree.vdot(s.p, s.ap) <= 0) | (s.rar <= 0)
        alpha = _safe_div(s.rar, tree.sum_of_squares(s.ap))
        x = tree.axpy(alpha, s.p, s.x)
        r = tree.axpy(-alpha, s.ap, s.r)
        ar = matvec(r)
        rar = tree.vdot(r, ar)
        beta = _safe_div(rar, s.rar)
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
        return _freeze(stop, kept, new)

    state, trips = _iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=state.x,
        num_iters=state.iters,
        num_matvecs=_counter(ref, used + trips),
        residual_norm=torch.sqrt(state.rr),
        negative_curvature=state.negative,
        hit_boundary=false,
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
    _check_options("minres", max_iters, rtol, atol, check_every)
    ref = _ref(b)
    max_iters = 2 * _size(b) if max_iters is None else max_iters
    tol = _tolerance(tree.norm(b), rtol, atol)
    x, r, used = _start(matvec, b, x0)
    beta1 = tree.norm(r)
    zero = torch.zeros_like(beta1)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    zeros = tree.zeros_like(b)
    state = _MinresState(
        x, r, r, zeros, zeros, beta1, zero, zero, zero, beta1, -torch.ones_like(beta1), zero,
        beta1 <= tol, _counter(ref), false,
    )  # fmt: skip

    def step(s: _MinresState) -> _MinresState:
        v = tree.scale(_safe_div(torch.ones_like(s.beta), s.beta), s.r2)
        y = tree.axpy(-_safe_div(s.beta, s.oldb), s.r1, matvec(v))
        alpha = tree.vdot(v, y)
        y = tree.axpy(-_safe_div(alpha, s.beta), s.r2, y)
        beta = tree.norm(y)
        # Apply the previous rotation, then make the new one (annihilates beta).
        delta = s.cs * s.dbar + s.sn * alpha
        gbar = s.sn * s.dbar - s.cs * alpha
        epsln = s.sn * beta
        dbar = -s.cs * beta
        gamma = torch.clamp(torch.hypot(gbar, beta), min=torch.finfo(beta.dtype).tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * s.phibar
        phibar = sn * s.phibar
        w = tree.scale(1 / gamma, tree.axpy(-delta, s.w, tree.axpy(-s.epsln, s.w2, v)))
        x = tree.axpy(phi, w, s.x)
        done = (phibar.abs() <= tol) | (beta == 0)
        return _MinresState(
            x, s.r2, y, w, s.w, beta, s.beta, dbar, epsln, phibar, cs, sn, done, s.iters + 1,
            s.negative | (alpha <= 0),
        )  # fmt: skip

    state, trips = _iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=state.x,
        num_iters=state.iters,
        num_matvecs=_counter(ref, used + trips),
        residual_norm=state.phibar.abs(),
        negative_curvature=state.negative,
        hit_boundary=false,
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
    root_a = _safe_div(q, dd)
    root_b = _safe_div(c, q)
    return torch.minimum(root_a, root_b), torch.maximum(root_a, root_b)


def steihaug(
    matvec: MatVec,
    grad: PyTree,
    radius: float | torch.Tensor,
    *,
    max_iters: int | None = None,
    rtol: float | torch.Tensor = 1e-5,
    atol: float = 0.0,
    check_every: int | None = 1,
) -> KrylovResult:
    """CG-Steihaug: approximately ``argmin_d <grad, d> + 0.5 <d, B d>`` s.t. ``||d|| <= radius``.

    Nocedal & Wright Alg. 7.2 with ``B = matvec``: CG on ``B d = -grad`` from
    ``z0 = 0`` (residual ``r = B z + grad``). On a direction with ``d^T B d <= 0`` it
    returns the boundary point ``z + tau d`` of smaller model value (both roots of
    ``||z + tau d|| = radius`` are tried); when a step would leave the region it stops
    at the boundary along it (``tau >= 0``); otherwise it stops at
    ``||r|| <= max(rtol ||grad||, atol)``. ``hit_boundary`` says the result lies on the
    sphere. The iterates grow in norm (Steihaug 1983), so the result stays inside.
    ``max_iters`` defaults to ``2 n``. ``radius`` must be positive and finite.
    """
    _check_options("steihaug", max_iters, rtol, atol, check_every)
    ref = _ref(grad)
    if not isinstance(radius, torch.Tensor) and not 0 < radius < float("inf"):
        raise ValueError(f"steihaug: radius must be positive and finite, got {radius}")
    radius = _like(radius, ref)
    max_iters = 2 * _size(grad) if max_iters is None else max_iters
    tol = _tolerance(tree.norm(grad), rtol, atol)
    rr = tree.sum_of_squares(grad)
    false = torch.zeros((), dtype=torch.bool, device=ref.device)
    z = tree.zeros_like(grad)
    state = _SteihaugState(
        z, grad, tree.neg(grad), rr, torch.sqrt(rr) <= tol, _counter(ref), false, false
    )

    def step(s: _SteihaugState) -> _SteihaugState:
        bd = matvec(s.d)
        dbd = tree.vdot(s.d, bd)
        negative = dbd <= 0
        alpha = _safe_div(s.rr, dbd)
        z_next = tree.axpy(alpha, s.d, s.z)
        outside = tree.norm(z_next) >= radius
        tau_minus, tau_plus = _boundary_steps(s.z, s.d, radius)
        # Model change along d from z: tau r^T d + 0.5 tau^2 d^T B d.
        rd = tree.vdot(s.r, s.d)
        m_minus = tau_minus * rd + 0.5 * tau_minus**2 * dbd
        m_plus = tau_plus * rd + 0.5 * tau_plus**2 * dbd
        tau_nc = torch.where(m_minus < m_plus, tau_minus, tau_plus)
        tau = torch.where(negative, tau_nc, tau_plus)
        hit = negative | outside
        z = tree.where(hit, tree.axpy(tau, s.d, s.z), z_next)
        r = tree.axpy(torch.where(hit, tau, alpha), bd, s.r)  # B z + grad at the new z
        rr = tree.sum_of_squares(r)
        d = tree.axpy(_safe_div(rr, s.rr), s.d, tree.neg(r))
        converged = torch.sqrt(rr) <= tol
        return _SteihaugState(z, r, d, rr, hit | converged, s.iters + 1, s.negative | negative, hit)

    state, trips = _iterate(step, state, max_iters, check_every)
    return KrylovResult(
        x=state.z,
        num_iters=state.iters,
        num_matvecs=_counter(ref, trips),
        residual_norm=torch.sqrt(state.rr),
        negative_curvature=state.negative,
        hit_boundary=state.boundary,
    )
