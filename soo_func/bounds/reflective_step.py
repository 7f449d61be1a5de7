"""The step of :func:`~soo_func.bounds.least_squares.trust_region_reflective`: an affine-scaled
trust-region model of ``0.5 |r(x)|^2`` on a box and its strictly feasible minimizers.

References: T. F. Coleman & Y. Li, "An interior trust region approach for nonlinear
minimization subject to bounds", SIAM J. Optim. 6(2), 1996 (CL96); M. A. Branch,
T. F. Coleman & Y. Li, "A subspace, interior, and conjugate gradient method for large-scale
bound-constrained minimization problems", SIAM J. Sci. Comput. 21(1), 1999 (BCL99);
J. J. Moré, "The Levenberg-Marquardt algorithm: implementation and theory", 1978 (section
5); Nocedal & Wright, *Numerical Optimization*, 2nd ed. (N&W), Algorithm 4.3.

At a feasible ``x`` with Jacobian ``J``, residuals ``r`` and gradient ``g = J^T r``:

* **Coleman-Li scaling** (CL96 eq. (2.3)): ``v_i = u_i - x_i`` where ``g_i < 0`` and
  ``u_i`` is finite, ``v_i = x_i - l_i`` where ``g_i > 0`` and ``l_i`` is finite, else
  ``v_i = 1`` (CL96 put ``g_i = 0`` on the lower side; ``v_i g_i = 0`` either way, and
  ``v_i = 1`` lets a point on a bound with zero gradient move). ``x`` is first-order
  stationary iff ``v * g = 0`` (CL96 eq. (2.2), ``D^2 g = 0`` with ``D = diag(v^(-1/2))``).
* **Scaled model** (CL96 eq. (2.6)-(2.8)): in the variables ``s_hat = D s``, with
  ``d = v^(1/2)`` (so ``s = d * s_hat``),
  ``psi(s_hat) = <g_hat, s_hat> + 0.5 |J_hat s_hat|^2 + 0.5 <s_hat, C s_hat>``,
  ``g_hat = d * g``, ``J_hat = J diag(d)``, ``C = diag(|g| * |v'|)`` (``|v'_i| = 1``
  where ``v_i`` is a distance to a bound, else 0). ``psi(s_hat) = 0.5 |A s_hat + b|^2 -
  0.5 |r|^2`` with ``A = [J_hat; C^(1/2)]``, ``b = [r; 0]``: one thin SVD of ``A`` solves
  the trust-region problem ``min psi, |s_hat| <= radius`` for every ``alpha``
  (``s_hat(alpha) = -V diag(sigma / (sigma^2 + alpha)) U^T b``), and Moré's safeguarded
  Newton iteration on ``|s_hat(alpha)| = radius`` (Moré 1978 eq. (5.5)-(5.6), N&W
  Algorithm 4.3) finds ``alpha``.
* **Step selection** (BCL99 section 3, the reflective variant of CL96 section 4): when
  ``x + d * p_hat`` leaves the box, the candidates are the trust-region step truncated at
  the first bound it meets and stepped back by ``theta`` (BCL99: ``theta = max(0.995,
  1 - |v * g|_inf)``), the step reflected at that bound (the hit components of ``p_hat``
  negated, the model minimized along the reflected ray inside the box and the trust
  region), and the scaled Cauchy step along ``-g_hat``; the lowest model value wins.
  Every candidate lies strictly inside the box.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from soo_func.bounds.box import Box

__all__ = [
    "ScaledModel",
    "coleman_li_scaling",
    "model_value",
    "scaled_model",
    "select_step",
    "step_to_bound",
    "trust_region_solution",
]

#: Moré's stopping test on the radius: ``| |s_hat| - radius | <= 0.1 radius`` (Moré 1978
#: section 5 uses sigma = 0.1).
RADIUS_RTOL = 0.1
#: The most Newton iterations on the secular equation (Moré 1978 reports 1-2 on average).
MAX_SECULAR_ITERS = 10


def coleman_li_scaling(
    x: torch.Tensor, g: torch.Tensor, box: Box
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, dv)``: Coleman and Li's scaling vector (see the module docstring) and
    ``|dv_i/dx_i|`` (1 where ``v_i`` is a distance to a bound, else 0)."""
    to_upper = (g < 0) & torch.isfinite(box.upper)
    to_lower = (g > 0) & torch.isfinite(box.lower)
    v = torch.where(to_upper, box.upper - x, torch.ones_like(x))
    v = torch.where(to_lower, x - box.lower, v)
    return v, (to_upper | to_lower).to(x.dtype)


class ScaledModel(NamedTuple):
    """The model ``psi`` in the scaled variables and the SVD of ``A = [J_hat; C^(1/2)]``:
    ``A = U diag(sigma) V^T``, ``ub = U^T b``."""

    d: torch.Tensor
    g_hat: torch.Tensor
    jac_hat: torch.Tensor
    c: torch.Tensor
    sigma: torch.Tensor
    vt: torch.Tensor
    ub: torch.Tensor


def scaled_model(jac: torch.Tensor, r: torch.Tensor, g: torch.Tensor, v: torch.Tensor,
                 dv: torch.Tensor) -> ScaledModel:  # fmt: skip
    """The scaled model at the point with Jacobian ``jac``, residuals ``r``, gradient ``g``
    and scaling ``(v, dv)`` (:func:`coleman_li_scaling`)."""
    d = torch.sqrt(v)
    jac_hat = jac * d
    c = g.abs() * dv
    augmented = torch.cat([jac_hat, torch.diag(torch.sqrt(c))])
    u, sigma, vt = torch.linalg.svd(augmented, full_matrices=False)
    ub = u[: r.numel()].T @ r
    return ScaledModel(d, d * g, jac_hat, c, sigma, vt, ub)


def model_value(model: ScaledModel, s_hat: torch.Tensor) -> torch.Tensor:
    """``psi(s_hat)``, 0-d."""
    js = model.jac_hat @ s_hat
    return torch.dot(model.g_hat, s_hat) + 0.5 * (
        torch.dot(js, js) + torch.dot(model.c * s_hat, s_hat)
    )


def trust_region_solution(model: ScaledModel, radius: float) -> torch.Tensor:
    """``s_hat`` minimizing ``psi`` on ``|s_hat| <= radius`` (Moré 1978 section 5): the
    Gauss-Newton step ``alpha = 0`` (minimum norm where ``A`` is rank deficient) when it is
    inside, else ``s_hat(alpha)`` with ``| |s_hat(alpha)| - radius | <= 0.1 radius`` from the
    safeguarded Newton iteration on ``phi(alpha) = |s_hat(alpha)| - radius``, scaled into
    the trust region."""
    sigma, w = model.sigma, model.sigma * model.ub  # A^T b = V w = g_hat
    eps = torch.finfo(sigma.dtype).eps
    rows = model.jac_hat.shape[0] + model.c.numel()
    tol = eps * rows * float(sigma.max()) if sigma.numel() else 0.0
    kept = sigma > tol
    gauss_newton = -model.vt.T @ torch.where(kept, model.ub / torch.where(kept, sigma, 1.0), 0.0)
    if float(torch.linalg.vector_norm(gauss_newton)) <= radius:
        return gauss_newton

    def phi(alpha: float) -> tuple[float, float, torch.Tensor]:
        denominator = sigma * sigma + alpha
        coefficients = w / denominator
        norm = float(torch.linalg.vector_norm(coefficients))
        slope = -float(torch.sum(coefficients * coefficients / denominator)) / max(norm, 1e-300)
        return norm - radius, slope, coefficients

    full_rank = bool(kept.all())
    low = 0.0
    if full_rank:
        value, slope, _ = phi(0.0)
        low = -value / slope if slope < 0 else 0.0
    high = float(torch.linalg.vector_norm(w)) / radius
    alpha = max(1e-3 * high, math.sqrt(max(low, 0.0) * high))
    coefficients = w / (sigma * sigma + alpha)
    for _ in range(MAX_SECULAR_ITERS):
        if not low <= alpha <= high:
            alpha = max(1e-3 * high, math.sqrt(max(low, 0.0) * high))
        value, slope, coefficients = phi(alpha)
        if abs(value) <= RADIUS_RTOL * radius:
            break
        if value < 0:
            high = alpha
        ratio = value / slope
        low = max(low, alpha - ratio)
        alpha = alpha - (value + radius) / radius * ratio
    step = -model.vt.T @ coefficients
    norm = float(torch.linalg.vector_norm(step))
    return step * (radius / norm) if norm > radius else step


def step_to_bound(x: torch.Tensor, p: torch.Tensor, box: Box) -> tuple[float, torch.Tensor]:
    """``(t, hits)``: the largest ``t`` with ``x + t p`` in the box (``inf`` when no bound
    is met) and the entries whose bound stops it."""
    up = torch.where(p > 0, (box.upper - x) / torch.where(p > 0, p, 1.0), torch.inf)
    down = torch.where(p < 0, (box.lower - x) / torch.where(p < 0, p, -1.0), torch.inf)
    each = torch.minimum(up, down)
    if each.numel() == 0:
        return math.inf, torch.zeros_like(x, dtype=torch.bool)
    t = float(each.amin())
    return t, each == t


def _sphere_crossing(base: torch.Tensor, direction: torch.Tensor, radius: float) -> float:
    """The ``t >= 0`` with ``|base + t direction| = radius`` (``|base| <= radius``)."""
    a = float(torch.dot(direction, direction))
    b = float(torch.dot(base, direction))
    c = float(torch.dot(base, base)) - radius * radius
    if a == 0:
        return math.inf
    return (-b + math.sqrt(max(b * b - a * c, 0.0))) / a


def _line_minimum(model: ScaledModel, base: torch.Tensor, direction: torch.Tensor,
                  low: float, high: float) -> torch.Tensor:  # fmt: skip
    """``base + t direction`` with ``t`` minimizing the quadratic ``psi`` on ``[low, high]``."""
    jd = model.jac_hat @ direction
    curvature = float(torch.dot(jd, jd) + torch.dot(model.c * direction, direction))
    slope = float(
        torch.dot(model.g_hat, direction) + torch.dot(model.jac_hat @ base, jd)
        + torch.dot(model.c * base, direction)
    )  # fmt: skip
    candidates = [low, high]
    if curvature > 0 and low < -slope / curvature < high:
        candidates.append(-slope / curvature)
    t = min(candidates, key=lambda s: slope * s + 0.5 * curvature * s * s)
    return base + t * direction


def select_step(x: torch.Tensor, box: Box, model: ScaledModel, p_hat: torch.Tensor,
                radius: float, theta: float) -> torch.Tensor:  # fmt: skip
    """The scaled step ``s_hat`` (``s = d * s_hat``): ``p_hat`` when ``x + d * p_hat`` stays
    in the box, else the best of the truncated, reflected and scaled Cauchy steps (module
    docstring)."""
    d = model.d
    stride, hits = step_to_bound(x, d * p_hat, box)
    if stride >= 1:
        return p_hat
    candidates = [theta * stride * p_hat]
    # Reflection at the bound: the margin to the hit bound at least the truncated step's.
    base = stride * p_hat
    reflected = torch.where(hits, -p_hat, p_hat)
    on_bound = box.project(x + d * base)
    to_bound, _ = step_to_bound(on_bound, d * reflected, box)
    to_sphere = _sphere_crossing(base, reflected, radius)
    high = theta * to_bound if to_bound < to_sphere else to_sphere
    low = (1 - theta) * stride
    if low <= high and math.isfinite(high):
        candidates.append(_line_minimum(model, base, reflected, low, high))
    # Scaled Cauchy step along -g_hat, inside the trust region and strictly in the box.
    descent = -model.g_hat
    g_norm = float(torch.linalg.vector_norm(descent))
    if g_norm > 0:
        to_bound, _ = step_to_bound(x, d * descent, box)
        to_sphere = radius / g_norm
        high = theta * to_bound if to_bound < to_sphere else to_sphere
        candidates.append(_line_minimum(model, torch.zeros_like(descent), descent, 0.0, high))
    values = [float(model_value(model, s)) for s in candidates]
    return candidates[min(range(len(values)), key=values.__getitem__)]
