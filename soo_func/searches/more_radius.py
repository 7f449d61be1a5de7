"""Moré's trust-region control of the Levenberg-Marquardt parameter (MINPACK ``lmder``).

J. J. Moré, "The Levenberg-Marquardt algorithm: implementation and theory", Numerical
Analysis (Dundee 1977), LNM 630, 1978, §§ 5-7. Instead of updating the damping ``lam``
directly, the step is bounded in the scaled norm ``|D p| <= radius`` (``D`` the running
maximum of the Jacobian's column norms) and ``lam`` is the parameter for which the
damped step ``p(lam) = argmin |J p + r|^2 + lam |D p|^2`` has ``|D p| = radius`` within
10% (``lam = 0`` when the Gauss-Newton step already lies within ``1.1 radius``). The
radius follows Moré's rules: ``rho <= 1/4`` shrinks it to ``mu min(radius, 10 |D p|)`` with
``mu`` in ``[0.1, 0.5]`` from a quadratic fit of the actual reduction; ``rho >= 3/4`` (or
``lam = 0``) sets it to ``2 |D p|``. The first radius is ``100 |D x0|`` (MINPACK's
``factor``), cut to ``|D p|`` after the first step.

:func:`lm_parameter` finds ``lam`` from the SVD of ``J D^{-1} = U S V^T`` (for
``m > n`` from the SVD of the n x n triangle of a QR of ``J``: :func:`scaled_svd`): with
``c = U^T r``, ``|D p(lam)| = |s c / (s^2 + lam)|``, and ``lam`` solves the secular
equation ``1/radius - 1/|D p(lam)| = 0`` by Newton's method safeguarded by a bisection
bracket (Moré's Algorithm 5.5, Hebden's iteration; Nocedal & Wright, *Numerical
Optimization*, 2nd ed., Algorithm 4.3 and section 10.3), for a fixed number of iterations with
``torch.where`` (no host synchronisation): at most 10, MINPACK ``lmpar``'s own limit; a
``lam`` within 10% stays fixed for the remaining ones.

Used by :func:`~soo_func.searches.levenberg_marquardt` with the dense solver (its default
there); the model pieces are in :mod:`soo_func.searches.damped_gauss_newton`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.searches.damped_gauss_newton import DampedModel

PyTree = Any

__all__ = [
    "RADIUS_FACTOR",
    "LMStep",
    "MoreStep",
    "lm_parameter",
    "more_radius_update",
    "more_step",
    "scaled_svd",
]

RADIUS_FACTOR = 100.0
"""MINPACK's ``factor``: the first radius is ``RADIUS_FACTOR * |D x0|``."""


class LMStep(NamedTuple):
    """The step ``p`` (flat), its parameter ``lam``, scaled length ``|D p|``, and the model
    terms ``|J p|^2`` (``model_sq``) and ``-<r, J p>`` (``model_slope``), from the SVD."""

    step: torch.Tensor
    damping: torch.Tensor
    scaled_norm: torch.Tensor
    model_sq: torch.Tensor
    model_slope: torch.Tensor


def scaled_svd(
    jac: torch.Tensor, r: torch.Tensor, diag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, V^T, U^T r)`` of the thin SVD ``J D^{-1} = U S V^T``.

    For ``m > n`` by the QR ``J = Q R`` first (Moré 1978 §3 reduces ``J`` to a triangle
    the same way; Golub & Van Loan, *Matrix Computations*, 4th ed., §8.6.3, R-SVD): then
    ``J D^{-1} = Q (R D^{-1})`` and the SVD ``R D^{-1} = U' S V^T`` of the n x n factor
    gives ``U = Q U'`` and ``U^T r = U'^T (Q^T r)``, so only an n x n matrix is
    decomposed by the SVD."""
    m, n = jac.shape
    if m <= n:
        u, s, vt = torch.linalg.svd(jac / diag, full_matrices=False)
        return s, vt, u.T @ r
    q, upper = torch.linalg.qr(jac)
    u, s, vt = torch.linalg.svd(upper / diag, full_matrices=False)
    return s, vt, u.T @ (q.T @ r)


def _total(v: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """The sum of the n-vector ``v`` as the product ``v @ ones`` (``ones`` unbatched): under
    ``vmap`` one matrix-vector product over the batch, where a reduction over a short inner
    dimension runs a slow kernel on the CPU."""
    return v @ ones


def lm_parameter(
    jac: torch.Tensor, r: torch.Tensor, diag: torch.Tensor, radius: torch.Tensor, iters: int = 10
) -> LMStep:
    """``lam >= 0`` with ``|D p(lam)|`` within 10% of ``radius`` (or 0), and ``p(lam)``.

    ``jac`` is ``m x n``, ``r`` the residuals, ``diag`` the positive scaling ``D``.
    Singular values below ``max(s) n eps`` count as zero (the Gauss-Newton step is then
    the minimum-norm one). With ``w`` the step's coordinates in ``V`` (``D p = -V w``),
    ``J p = -U S w``, so ``|J p|^2 = |S w|^2`` and ``-<r, J p> = <S c, w>``: the model's
    terms come from n-vectors, without a product with ``J`` (MINPACK ``lmder`` takes them
    from the triangle ``R`` the same way).
    """
    s, vt, c = scaled_svd(jac, r, diag)
    ones = torch.ones(s.shape[-1], dtype=s.dtype, device=s.device)
    sc = s * c
    rank_tol = s.max() * max(jac.shape) * torch.finfo(s.dtype).eps
    keep = s > rank_tol
    s2, sc2 = s * s, sc * sc
    sc_kept = torch.where(keep, sc, torch.zeros_like(sc))
    s2_kept = torch.where(keep, s2, ones)  # w = sc_kept / (s2_kept + lam) is 0 off ``keep``

    def scaled(lam):
        w = sc_kept / (s2_kept + lam)
        return w, torch.sqrt(_total(w * w, ones))

    w_gn = torch.where(keep, c / torch.where(keep, s, ones), torch.zeros_like(s))
    gn_norm = torch.sqrt(_total(w_gn * w_gn, ones))
    tiny = torch.finfo(s.dtype).tiny
    lo = torch.zeros_like(radius)
    hi = torch.sqrt(_total(sc2, ones)) / torch.clamp(radius, min=tiny)  # |q(hi)| <= radius
    lam = hi * 1e-3
    use_gn = gn_norm <= 1.1 * radius
    done, tenth = use_gn, 0.1 * radius
    for _ in range(iters):
        _, norm = scaled(lam)
        above = norm > radius
        done = done | ((norm - radius).abs() <= tenth)
        lo = torch.where(above, lam, lo)
        hi = torch.where(above, hi, lam)
        slope = _total(sc2 / (s2 + lam) ** 3, ones) / torch.clamp(norm, min=tiny)  # -d|q|/dlam
        newton = lam + (norm / radius - 1) * norm / torch.clamp(slope, min=tiny)
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        fallback = torch.where(lo > 0, torch.sqrt(lo * hi), hi * 1e-2)
        lam = torch.where(done, lam, torch.where(inside, newton, fallback))
    w, norm = scaled(lam)
    w = torch.where(use_gn, w_gn, w)
    lam = torch.where(use_gn, torch.zeros_like(lam), lam)
    q = -(vt.T @ w)
    sw = s * w
    model_sq, model_slope = _total(sw * sw, ones), _total(sc * w, ones)
    return LMStep(q / diag, lam, torch.where(use_gn, gn_norm, norm), model_sq, model_slope)


def more_radius_update(
    radius: torch.Tensor,
    ratio: torch.Tensor,
    scaled_norm: torch.Tensor,
    damping: torch.Tensor,
    value: torch.Tensor,
    trial_value: torch.Tensor,
    model_decrease: torch.Tensor,
) -> torch.Tensor:
    """Moré's radius rule (MINPACK ``lmder``), in the units of the loss ``0.5 |r|^2``.

    ``model_decrease`` is ``|J p|^2 + lam |D p|^2`` over ``2 value`` (MINPACK's
    ``-dirder``); the actual relative reduction is ``1 - trial_value / value``, taken as
    ``-1`` when the residual norm grew tenfold (or is not finite).
    """
    grew = ~(trial_value < 100 * value)
    actual = torch.where(grew, -torch.ones_like(value), 1 - trial_value / value)
    dirder = -model_decrease
    fit = 0.5 * dirder / (dirder + 0.5 * actual)
    mu = torch.where(actual >= 0, torch.full_like(actual, 0.5), fit)
    mu = torch.where(grew | ~(mu >= 0.1), torch.full_like(mu, 0.1), mu)
    shrunk = mu * torch.minimum(radius, 10 * scaled_norm)
    grown = 2 * scaled_norm
    new = torch.where((damping == 0) | (ratio >= 0.75), grown, radius)
    return torch.where(ratio <= 0.25, shrunk, new)


class MoreStep(NamedTuple):
    """A step of Moré's rule: the damped model (``damping`` is the ``lam`` found for the
    radius) and what the radius rule needs: the radius the step was bounded by, ``|D p|``
    and MINPACK's ``-dirder`` (``model_decrease``)."""

    model: DampedModel
    radius: torch.Tensor
    scaled_norm: torch.Tensor
    model_decrease: torch.Tensor


def more_step(
    radius: torch.Tensor,
    params: PyTree,
    jac: torch.Tensor,
    r: torch.Tensor,
    damping_diag: torch.Tensor,
) -> MoreStep:
    """The step of radius ``radius`` (negative: the first step, radius ``RADIUS_FACTOR |D x|``
    cut to the Gauss-Newton step's ``|D p|``) with Moré's ``D = sqrt(damping_diag)``, the square
    root of Marquardt's diagonal (flat)."""
    diag = torch.sqrt(damping_diag)
    scaled_x = torch.linalg.vector_norm(diag * tree.ravel(params).flat)
    start = RADIUS_FACTOR * torch.where(scaled_x > 0, scaled_x, torch.ones_like(scaled_x))
    first = radius < 0
    radius = torch.where(first, start, radius)
    lm = lm_parameter(jac, r, diag, radius)
    radius = torch.where(first, torch.minimum(radius, lm.scaled_norm), radius)
    twice_value = torch.clamp(torch.dot(r, r), min=torch.finfo(r.dtype).tiny)
    decrease = (lm.model_sq + lm.damping * lm.scaled_norm**2) / twice_value
    model = DampedModel(
        step=tree.unravel(lm.step, params),
        predicted=lm.model_slope - 0.5 * lm.model_sq,  # m(0) - m(p), m(p) = 0.5 |J p + r|^2
        damping=lm.damping,
        damping_diag=tree.unravel(damping_diag, params),
        valid=torch.isfinite(lm.step).all(),
    )
    return MoreStep(model, radius, lm.scaled_norm, decrease)
