"""Self-scaled quasi-Newton directions: SSBFGS and SSBroyden (dense, inverse form).

The self-scaled Broyden class in inverse form, as used for PINNs by Urbán, Stefanou & Pons
(JCP 2025, "Unveiling the optimization process of physics informed neural networks",
arXiv:2405.04230) and Kiyani et al. (CMAME 2025), after Al-Baali (JOTA 1998,
"Numerical experience with a class of self-scaling quasi-Newton algorithms") and
Al-Baali & Khalfan (2005)::

    H+ = (1/tau) [H - H y y^T H / y^T H y + phi (y^T H y) v v^T] + s s^T / s^T y,
    v  = s / s^T y - H y / y^T H y.

``phi = 1`` is BFGS, ``phi = 0`` DFP; ``tau = 1`` is the unscaled Broyden class (N&W sec.
6.3) in inverse form. Equation numbers of Urbán et al. below are those their reference code
cites (eq. (11) for SSBFGS's ``tau``, eqs. (13)-(23) for SSBroyden's parameters). With
``B = H^{-1}`` the scalars are (Al-Baali 1998)::

    b = s^T B s / s^T y,   h = y^T H y / s^T y,   a = b h - 1 >= 0.

After a line-search step ``s = alpha d`` along ``d = -H g`` one has ``B s = -alpha g`` and
``b = -alpha s^T g / s^T y`` (the papers' form): no solve. Here ``alpha = s^T d / d^T d``
is read back from the stored direction, and ``s^T B s = alpha^2 d^T B d`` with
``d^T B d = -g^T d`` (``|g|^2 / h0`` after a reset to ``h0 I``). Under a trust region the step
is not along ``d``; the projection then gives an estimate of ``b`` (the papers use a line
search, and so should a self-scaled method).

* **SSBFGS** (``phi = 1``): ``tau = min(1, 1/b)`` (Al-Baali 1998; Urbán et al. eq. (11),
  their ``SSBFGS_AB``); ``scaling="oren-luenberger"`` takes ``tau = 1/b`` (Oren &
  Luenberger 1974, ``SSBFGS_OL``); ``scaling="none"`` is BFGS.
* **SSBroyden** (Urbán et al. eqs. (13)-(23), their ``SSBroyden2``; the Broyden parameter
  ``theta`` in direct form, ``theta = 0`` BFGS, ``theta = 1`` DFP)::

    rho- = min(1, h (1 - sqrt(a / (1 + a)))),   theta- = (rho- - 1) / a,   theta+ = 1 / rho-,
    theta = max(theta-, min(theta+, (1 - b) / b)),   sigma = 1 + a theta,
    phi = (1 - theta) / sigma,   rho~ = min(1, 1/b),
    tau = min(rho~ sigma^(1/(1-n)), sigma)       if theta <= 0,
    tau = rho~ min(sigma^(1/(1-n)), 1/theta)     if theta >  0.

  SSBFGS is its ``theta = 0`` member (``sigma = 1``, ``tau = rho~``). Where ``a = 0`` every
  member gives the same matrix (``v = 0``): ``theta- = -inf`` and ``theta`` stays finite.

The first update from an unscaled ``H0 = I`` (``initial_scaling=None``) uses the papers'
``initial_scale`` choice ``tau = h / sigma`` (for SSBFGS ``tau = y^T y / s^T y``: N&W eq. 6.20).
A fixed ``initial_scaling`` keeps ``H0 = c I`` and self-scales from the first pair, as the
papers' PINN runs do (``H0 = I``, ``initial_scale=False``).

Safeguards as :func:`soo_func.bfgs` (``torch.where``, no host sync): a pair with
``s^T y <= eps |s| |y|`` (or non-finite) is skipped; where ``b`` is not positive and finite the
update is the unscaled BFGS one; a non-descent or non-finite direction is replaced by ``-g``
and the matrix reset to ``h0 I``. The update is one ``n x n`` scaling and two symmetric
rank-one ``addmm_`` (:func:`self_scaled_update`). ``ssbfgs(memory_size=m)`` is the
limited-memory SSBFGS of :mod:`soo_func.directions.self_scaled_memory` (the two-loop
recursion with a weight per stored pair, the product of the later ``1/tau_j``). SSBroyden has
no limited-memory form here: its ``phi != 1`` members are not a two-loop recursion (a compact
Broyden-class representation would be), and its ``tau`` needs ``y^T H y``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.directions import pair_memory as pm
from soo_func.directions.dense_update import (
    add_low_rank,
    dense_curvature,
    ratio_or_zero,
    reset_where,
)
from soo_func.directions.self_scaled_memory import limited_memory_ssbfgs, ssbfgs_tau
from soo_func.options import check_in, check_nonnegative, check_positive

__all__ = [
    "SCALINGS",
    "SelfScaledState",
    "self_scaled_parameters",
    "self_scaled_update",
    "ssbfgs",
    "ssbroyden",
]

SCALINGS = ("al-baali", "oren-luenberger", "none")


class SelfScaledState(NamedTuple):
    """As :class:`soo_func.directions.quasi_newton.DenseQuasiNewtonState` (``matrix`` is ``H``;
    ``scaled``: a pair was taken since the start or the last reset, so ``matrix`` is no longer
    ``h0 I``; until then ``step_hint`` is ``min(1, 1/|g|)``, as scipy's first BFGS step), plus
    ``direction``: the last direction ``d`` (``[n]``) and ``direction_curvature``: ``d^T B d``
    (0-d), read back to form ``b = s^T B s / s^T y`` without a solve."""

    matrix: torch.Tensor
    prev_point: torch.Tensor
    has_prev: torch.Tensor
    scaled: torch.Tensor
    step_hint: torch.Tensor
    ascent: torch.Tensor
    direction: torch.Tensor
    direction_curvature: torch.Tensor


class _Config(NamedTuple):
    broyden: bool  # SSBroyden's theta rule; else SSBFGS (theta = 0)
    scaling: str
    curvature_eps: float | None
    initial_scaling: float | None


def self_scaled_update(matrix, s, y, h_y, tau, phi, ok) -> torch.Tensor:
    """The self-scaled Broyden-class inverse update (module docstring) where ``ok``, else
    ``matrix``; ``h_y = H y``. Expanded in ``u = H y``, ``c = y^T u``, ``r = 1 / s^T y``::

        H+ = H / tau + (phi - 1) / (tau c) u u^T - phi r / tau (s u^T + u s^T)
             + (phi c r^2 / tau + r) s s^T,

    evaluated as one fresh ``H / tau`` and two rank-one ``addmm_``
    (:func:`~soo_func.directions.dense_update.add_low_rank`). The ``2 x 2`` coefficient
    matrix ``C`` on ``[u, s]`` is split by ``eigh`` into ``C = V diag(lam) V^T``, so the
    correction is ``sum_k sign(lam_k) p_k p_k^T`` with ``p_k = sqrt|lam_k| [u, s] v_k``: each
    rank-one update adds the same product ``p_ik p_jk`` to ``(i, j)`` and ``(j, i)``, so the
    result is exactly symmetric (a product ``[u, s] C [u, s]^T`` drifts from symmetry by the
    rounding of its cancelling terms: ``1e-10`` relative in 40 SSBroyden steps on Wood).
    Rejected pairs get ``tau = 1`` and zero vectors: no ``n x n`` select."""
    sy, c = s @ y, y @ h_y
    one = torch.ones_like(sy)
    r = ratio_or_zero(one, sy, ok)
    inv_tau = torch.where(ok, ratio_or_zero(one, tau, ok), one)
    c_uu = ratio_or_zero(phi - 1, c, ok) * inv_tau
    c_su = torch.where(ok, -phi * r * inv_tau, torch.zeros_like(sy))
    c_ss = torch.where(ok, phi * c * r * r * inv_tau + r, torch.zeros_like(sy))
    coefs = torch.stack([torch.stack([c_uu, c_su]), torch.stack([c_su, c_ss])])
    lam, vecs = torch.linalg.eigh(coefs)
    basis = torch.stack([torch.where(ok, h_y, 0.0), torch.where(ok, s, 0.0)], dim=1)
    factors = basis @ (vecs * torch.sqrt(torch.abs(lam)))
    return add_low_rank(matrix, factors * torch.sign(lam), factors, ok, scale=inv_tau)


def _theta_ssbroyden(a, b, h) -> torch.Tensor:
    """Urbán et al. eqs. (13)-(23) (``SSBroyden2``): ``theta = max(theta-, min(theta+,
    (1 - b) / b))`` with ``rho- = min(1, h (1 - sqrt(a / (1 + a))))``, ``theta- = (rho- - 1)
    / a`` (``-inf`` at ``a = 0``, where the class collapses to one matrix), ``theta+ = 1 /
    rho-``. Needs ``b > 0``."""
    rho_minus = torch.clamp(h * (1 - torch.sqrt(a / (1 + a))), max=1.0)
    positive = a > 0
    theta_minus = torch.where(positive, (rho_minus - 1) / torch.where(positive, a, 1.0), -math.inf)
    return torch.maximum(theta_minus, torch.minimum(1 / rho_minus, (1 - b) / b))


def self_scaled_parameters(b, h, n: int, first, broyden: bool, scaling: str = "al-baali"):
    """``(tau, phi, theta)`` from Al-Baali's ``b``, ``h`` (module docstring) for ``n``
    params; ``first``: the first update from an unscaled ``H0`` (``tau = h / sigma``).

    SSBFGS (``broyden=False``): ``theta = 0``, ``phi = 1``, ``tau = min(1, 1/b)``
    (``"al-baali"``), ``1/b`` (``"oren-luenberger"``) or 1 (``"none"``). SSBroyden: ``theta``
    by :func:`_theta_ssbroyden`, ``phi = (1 - theta) / sigma``, ``tau`` by the two-case rule
    with ``sigma^(1/(1-n))`` (1 for ``n = 1``)."""
    a = torch.clamp(b * h - 1, min=0.0)
    theta = _theta_ssbroyden(a, b, h) if broyden else torch.zeros_like(b)
    sigma = 1 + a * theta
    phi = (1 - theta) / sigma
    if broyden:
        rho_tilde = ssbfgs_tau(b, "al-baali")
        power = torch.exp(torch.log(sigma) / (1 - n)) if n > 1 else torch.ones_like(sigma)
        positive = theta > 0
        safe_theta = torch.where(positive, theta, 1.0)
        tau = torch.where(
            positive,
            rho_tilde * torch.minimum(power, 1 / safe_theta),
            torch.minimum(rho_tilde * power, sigma),
        )
    else:
        tau = ssbfgs_tau(b, scaling)
    return torch.where(first, h / sigma, tau), phi, theta


def _scalars(state: SelfScaledState, s, y, h_y):
    """Al-Baali's ``b`` and ``h``, and whether ``b`` is usable (positive, finite)."""
    d = state.direction
    sy, dd = s @ y, d @ d
    alpha = ratio_or_zero(s @ d, dd, dd > 0)
    sbs = alpha * alpha * state.direction_curvature
    h = ratio_or_zero(y @ h_y, sy, sy > 0)
    b = ratio_or_zero(sbs, sy, sy > 0)
    usable = (b > 0) & torch.isfinite(b)
    return torch.where(usable, b, 1.0), h, usable


def _accept(cfg: _Config, s, y, h_y) -> torch.Tensor:
    """The BFGS skip rule ``s^T y > eps |s| |y|`` (finite), and ``y^T H y > 0``."""
    eps = torch.finfo(s.dtype).eps if cfg.curvature_eps is None else cfg.curvature_eps
    s_norm, y_norm = torch.linalg.vector_norm(s), torch.linalg.vector_norm(y)
    yhy = y @ h_y
    finite = torch.isfinite(s_norm * y_norm) & torch.isfinite(yhy)
    return finite & (s @ y > eps * s_norm * y_norm) & (yhy > 0)


def _dense(cfg: _Config, who: str) -> Transform:
    h0 = 1.0 if cfg.initial_scaling is None else cfg.initial_scaling
    fixed = cfg.initial_scaling is not None

    def init(params: Any) -> SelfScaledState:
        leaves = tree.leaves(params)
        n = sum(leaf.numel() for leaf in leaves)
        dtype, device = pm.compute_dtype(leaves[0].dtype), leaves[0].device
        zero = torch.zeros((), dtype=dtype, device=device)
        return SelfScaledState(
            matrix=h0 * torch.eye(n, dtype=dtype, device=device),
            prev_point=torch.zeros(2, n, dtype=dtype, device=device),
            has_prev=torch.zeros((), dtype=torch.bool, device=device),
            scaled=torch.zeros((), dtype=torch.bool, device=device),
            step_hint=torch.ones((), dtype=dtype, device=device),
            ascent=torch.zeros((), dtype=torch.bool, device=device),
            direction=torch.zeros(n, dtype=dtype, device=device),
            direction_curvature=zero,
        )

    def updated_matrix(state: SelfScaledState, s, y):
        matrix = state.matrix
        h_y = matrix @ y
        ok = state.has_prev & _accept(cfg, s, y, h_y)
        b, h, usable = _scalars(state, s, y, h_y)
        first = ~state.scaled & torch.full_like(state.scaled, not fixed)
        tau, phi, _ = self_scaled_parameters(b, h, s.numel(), first, cfg.broyden, cfg.scaling)
        # b unusable (no line-search step to read it from): the unscaled BFGS update.
        plain = ~usable & ~first
        tau = torch.where(plain, 1.0, tau)
        phi = torch.where(~usable, 1.0, phi)
        tau = torch.where(first & ~usable, h, tau)
        return self_scaled_update(matrix, s, y, h_y, tau, phi, ok), ok

    def update(updates, state: SelfScaledState, params=None, **extra):
        del extra
        if params is None:
            raise TypeError(f"{who} needs params in update(updates, state, params) to form s")
        point = torch.stack(pm.flat_point(params, updates)).to(state.matrix.dtype)
        s, y = point - state.prev_point
        g = point[1]
        matrix, ok = updated_matrix(state, s, y)
        scaled = state.scaled | ok
        direction = -(matrix @ g)
        slope = g @ direction
        descent = torch.isfinite(slope) & (slope < 0)
        matrix = reset_where(matrix, descent, h0)
        direction = torch.where(descent, direction, -g)
        gg = g @ g
        curvature = torch.where(descent, -slope, gg / h0)
        scaled = scaled & descent
        first_step = torch.clamp(torch.rsqrt(gg), max=1.0)
        hint = torch.where(~scaled & (gg > 0), first_step, torch.ones_like(first_step))
        new_state = SelfScaledState(
            matrix,
            point,
            torch.ones_like(state.has_prev),
            scaled,
            hint,
            ~descent,
            direction,
            curvature,
        )
        like = tree.leaves(params)[0]
        return tree.unravel(direction.to(like.dtype), params), new_state

    def publish(state: SelfScaledState, params=None, **extra) -> dict[str, Any]:
        del extra
        curvature = dense_curvature(state.matrix, params, inverse=True)
        return {"curvature": curvature, "step_hint": state.step_hint}

    return guarded(who, Transform(init, update, publish), SelfScaledState)


def _make(who: str, cfg: _Config, memory_size: int | None = None) -> Transform:
    check_in(who, "scaling", cfg.scaling, SCALINGS)
    if cfg.curvature_eps is not None:
        check_nonnegative(who, "curvature_eps", cfg.curvature_eps)
    if cfg.initial_scaling is not None:
        check_positive(who, "initial_scaling", cfg.initial_scaling)
    if memory_size is None:
        return _dense(cfg, who)
    return limited_memory_ssbfgs(
        memory_size,
        cfg.scaling,
        cfg.initial_scaling,
        cfg.curvature_eps,
        f"{who}(memory_size={memory_size})",
    )


def ssbfgs(
    *,
    memory_size: int | None = None,
    scaling: str = "al-baali",
    initial_scaling: float | None = 1.0,
    curvature_eps: float | None = None,
) -> Transform:
    """The self-scaled BFGS direction (module docstring; dense ``n x n`` inverse ``H``, or
    limited memory with ``memory_size``).

    Args:
      memory_size: ``None`` for the dense matrix, else the number of pairs ``(s, y)`` kept
        (:mod:`soo_func.directions.self_scaled_memory`: the SSBFGS updates of the ``m``
        newest pairs from ``H0``, by a weighted two-loop recursion).
      scaling: ``"al-baali"`` (``tau = min(1, 1/b)``, Urbán et al. eq. (11), the papers'
        SSBFGS), ``"oren-luenberger"`` (``tau = 1/b``) or ``"none"`` (BFGS).
      initial_scaling: ``H0 = initial_scaling * I``, self-scaled from the first pair (the
        papers' PINN setting, ``H0 = I``); ``None``: ``H0 = I`` rescaled by N&W eq. 6.20
        at the first pair, as :func:`soo_func.bfgs` does by default (with ``memory_size``:
        ``H0 = gamma I`` of the newest pair at every step, N&W eq. 7.20, as
        :func:`soo_func.lbfgs`; ``scaling="none"`` is then ``bfgs(memory_size=m)``).
      curvature_eps: skip pairs with ``s^T y <= curvature_eps |s||y|`` (default: the
        dtype's machine epsilon).

    Publishes ``curvature`` (``v -> H^{-1} v``: a dense solve; with ``memory_size`` the
    compact direct BFGS formula on the rescaled pairs) and ``step_hint``. Use it with
    a line search (``wolfe``, as the papers do): ``b`` is read off the line-search step.
    """
    return _make("ssbfgs", _Config(False, scaling, curvature_eps, initial_scaling), memory_size)


def ssbroyden(
    *,
    memory_size: int | None = None,
    initial_scaling: float | None = 1.0,
    curvature_eps: float | None = None,
) -> Transform:
    """The self-scaled Broyden-class direction (Urbán et al. eqs. (13)-(23), ``SSBroyden2``;
    module docstring): ``theta``, ``phi`` and ``tau`` chosen per pair from ``a``, ``b``,
    ``h``. Args as :func:`ssbfgs` (``initial_scaling=None``: the papers' first-pair
    ``tau = h / sigma``). Publishes ``curvature`` and ``step_hint``. Dense only: a
    ``memory_size`` is refused (module docstring; ``ssbfgs(memory_size=m)`` is the
    limited-memory self-scaled method)."""
    if memory_size is not None:
        raise ValueError(
            f"ssbroyden: memory_size must be None (the dense form), got {memory_size!r}: the "
            "self-scaled Broyden class has no two-loop (limited-memory) form here; use the "
            "dense ssbroyden() or the limited-memory ssbfgs(memory_size=m)"
        )
    return _make("ssbroyden", _Config(True, "al-baali", curvature_eps, initial_scaling))
