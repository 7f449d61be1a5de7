"""Dense quasi-Newton directions: BFGS, DFP, SR1 and Broyden.

Each keeps an ``n x n`` matrix over the raveled params: the inverse approximation
``H`` (``form="inverse"``, direction ``-H g``) or the Hessian approximation ``B``
(``form="direct"``, direction ``-B^{-1} g`` by a dense solve). With ``memory_size=m``
the same methods use the limited-memory transform of
:mod:`soo_func.directions.limited_memory` instead (BFGS's inverse form is L-BFGS, the
two-loop recursion; the other forms are compact representations).

Updates (Nocedal & Wright 2006, chapter 6), with ``rho = 1 / y^T s``:

* BFGS: ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` (eq. 6.17),
  ``B+ = B - B s s^T B / s^T B s + y y^T / y^T s`` (eq. 6.19).
* DFP: ``H+ = H - H y y^T H / y^T H y + s s^T / y^T s`` (eq. 6.15),
  ``B+ = (I - rho y s^T) B (I - rho s y^T) + rho y y^T`` (eq. 6.13).
* SR1: ``B+ = B + (y - B s)(y - B s)^T / (y - B s)^T s`` (eq. 6.24),
  ``H+ = H + (s - H y)(s - H y)^T / (s - H y)^T y`` (eq. 6.25).
* Broyden's (good) method on the gradient: ``B+ = B + (y - B s) s^T / s^T s``
  (N&W eq. 11.24, nonsymmetric), ``H+ = H + (s - H y) s^T H / s^T H y`` (Sherman-Morrison).

Safeguards, all by ``torch.where`` (no host sync): BFGS/DFP skip a pair with
``s^T y <= eps |s| |y|``; SR1 skips unless ``|s^T (y - B s)| >= r |s| |y - B s|``
(eq. 6.26); Broyden skips ``s = 0`` (and, inverse form, ``|s^T H y| <= eps |s| |H y|``).
BFGS offers Powell's damping (N&W Procedure 18.2). When the direction is not a
descent direction it is replaced by ``-g``; BFGS and DFP also reset the matrix then (it
can only happen through rounding or non-finite pairs), SR1 and Broyden keep it by default
(``reset_on_ascent=False``: their matrices are indefinite by design, and a trust region
after them reads the matrix through the published ``curvature``), except on a second ascent
in a row after a step along that ``-g`` (a line search took it, and its pair did not repair
the matrix: kept, it would give ``-g`` for ever, steepest descent). A non-finite direction
always resets the matrix. Before the first
update the initial matrix is rescaled to ``H0 = (y^T s / y^T y) I`` (eq. 6.20) unless
``initial_scaling`` fixes ``H0``; DFP keeps sizing ``H`` that way before every update
(Oren & Luenberger's ``tau = s^T y / y^T H y``): without it DFP corrects a too-small ``H``
only slowly (N&W section 6.1) and crawls along nearly orthogonal directions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.directions import pair_memory as pm
from soo_func.directions.dense_update import (
    dense_curvature,
    dense_update,
    ratio_or_zero,
    reset_where,
)
from soo_func.directions.limited_memory import limited_memory
from soo_func.options import check_in, check_interval, check_nonnegative, check_positive

__all__ = ["METHODS", "DenseQuasiNewtonState", "bfgs", "broyden", "dense_update", "dfp", "sr1"]

METHODS = ("bfgs", "dfp", "sr1", "broyden")
FORMS = ("inverse", "direct")


class DenseQuasiNewtonState(NamedTuple):
    """``matrix``: ``H`` or ``B`` (``n x n``; float32 for bfloat16/float16 params); ``prev_point``: flat params and gradient at the
    last update (``[2, n]``); ``has_prev``, ``scaled`` (``H0`` rescaled yet): 0-d bools;
    ``step_hint``: a step-length hint for the search (``1 / |g|`` while ``matrix`` is ``H0``);
    ``ascent``: 0-d bool, the last direction was the ``-g`` fallback."""

    matrix: torch.Tensor
    prev_point: torch.Tensor
    has_prev: torch.Tensor
    scaled: torch.Tensor
    step_hint: torch.Tensor
    ascent: torch.Tensor


def _solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve_ex(matrix, rhs)[0]


class _Config(NamedTuple):
    method: str
    form: str
    curvature_eps: float | None
    sr1_rtol: float | None
    damping: bool
    initial_scaling: float | None
    reset_on_ascent: bool = True


def _sr1_default_rtol(dtype: torch.dtype) -> float:
    """``sqrt(eps)``: N&W's ``r = 1e-8`` in float64, scaled to the dtype's rounding."""
    return torch.finfo(dtype).eps ** 0.5


def _sr1_rule(a, b, m_a, rtol):
    """N&W eq. 6.26: ``|a^T (b - M a)| > rtol |a| |b - M a|``."""
    residual = b - m_a
    norms = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(residual)
    return torch.abs(a @ residual) > rtol * norms


def _accept(cfg: _Config, s, y, b_s, h_y) -> torch.Tensor:
    """The skip rule of ``cfg.method`` for the pair ``(s, y)``; ``b_s = B s``, ``h_y = H y``.

    SR1 needs both eq. 6.26 (the direct update's denominator) and its dual
    ``|y^T (s - H y)| >= r |y| |s - H y|`` (the inverse update's), so that both forms
    skip the same pairs and stay inverses of each other."""
    eps = torch.finfo(s.dtype).eps if cfg.curvature_eps is None else cfg.curvature_eps
    s_norm, y_norm = torch.linalg.vector_norm(s), torch.linalg.vector_norm(y)
    finite = torch.isfinite(s_norm * y_norm)
    if cfg.method in ("bfgs", "dfp"):
        return finite & (s @ y > eps * s_norm * y_norm)
    if cfg.method == "sr1":
        finite = finite & (s_norm > 0)  # a rejected trust-region step gives s = y = 0
        rtol = _sr1_default_rtol(s.dtype) if cfg.sr1_rtol is None else cfg.sr1_rtol
        return finite & _sr1_rule(s, y, b_s, rtol) & _sr1_rule(y, s, h_y, rtol)
    ok = finite & (s_norm > 0)
    if cfg.form == "inverse":
        ok = ok & (torch.abs(s @ h_y) > eps * s_norm * torch.linalg.vector_norm(h_y))
    return ok


def _scalable(s, y) -> torch.Tensor:
    """Whether eq. 6.20's ``gamma = s^T y / y^T y`` is usable (positive and finite)."""
    sy, yy = s @ y, y @ y
    return (sy > 0) & (yy > 0) & torch.isfinite(sy)


def _sizing(s, y, h_y, ok) -> torch.Tensor:
    """Oren & Luenberger's sizing factor: ``H <- tau H`` (``B <- B / tau``),
    ``tau = s^T y / y^T H y`` (eq. 6.20 at every step; Contreras & Tapia, JOTA 78, 1993),
    where ``ok`` and ``tau > 0``, else 1."""
    sy, yhy = s @ y, y @ h_y
    usable = ok & (sy > 0) & (yhy > 0) & torch.isfinite(sy / yhy)
    return torch.where(usable, ratio_or_zero(sy, yhy, usable), torch.ones_like(sy))


def _along(s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Whether ``s != 0`` was taken along ``d``: ``s^T d >= (1 - sqrt(eps)) |s| |d|``."""
    tol = 1 - torch.finfo(s.dtype).eps ** 0.5
    norms = torch.linalg.vector_norm(s) * torch.linalg.vector_norm(d)
    return (norms > 0) & (s @ d >= tol * norms)


def _powell_damped(s, y, b_s) -> torch.Tensor:
    """N&W Procedure 18.2: ``r = theta y + (1 - theta) B s`` so that ``s^T r >= 0.2 s^T B s``."""
    sbs, sy = s @ b_s, s @ y
    low = sy < 0.2 * sbs
    theta = torch.where(low, ratio_or_zero(0.8 * sbs, sbs - sy, low), torch.ones_like(sy))
    return theta * y + (1 - theta) * b_s


def _dense(cfg: _Config, who: str) -> Transform:
    inverse = cfg.form == "inverse"

    def init(params: Any) -> DenseQuasiNewtonState:
        leaves = tree.leaves(params)
        n = sum(leaf.numel() for leaf in leaves)
        dtype, device = pm.compute_dtype(leaves[0].dtype), leaves[0].device
        h0 = 1.0 if cfg.initial_scaling is None else cfg.initial_scaling
        diag = h0 if inverse else 1.0 / h0
        one = torch.ones((), dtype=dtype, device=device)
        return DenseQuasiNewtonState(
            matrix=torch.eye(n, dtype=dtype, device=device).mul_(diag),
            prev_point=torch.zeros(2, n, dtype=dtype, device=device),
            has_prev=torch.zeros((), dtype=torch.bool, device=device),
            scaled=torch.full((), cfg.initial_scaling is not None, device=device),
            step_hint=one,
            ascent=torch.zeros((), dtype=torch.bool, device=device),
        )

    def initial_factor(state, s, y):
        """N&W eq. 6.20: ``H0 = (y^T s / y^T y) I`` before the first update. Until then the
        matrix is ``I`` (``scaled`` false), so ``H0`` is the matrix times ``gamma`` (``B0``:
        divided by it); 1 after the first update."""
        sy, yy = s @ y, y @ y
        usable = _scalable(s, y)
        gamma = torch.where(usable, ratio_or_zero(sy, yy, usable), torch.ones_like(sy))
        factor = gamma if inverse else 1.0 / gamma
        first = state.has_prev & ~state.scaled
        return torch.where(first, factor, torch.ones_like(factor))

    def products(matrix, scale, s, y):
        """``B s`` and ``H y`` of ``scale * matrix`` (``None`` where no rule reads them: the
        inverse form's ``B s`` and the direct form's ``H y`` cost a dense solve)."""
        if inverse:
            b_s = _solve(matrix, s) / scale if cfg.damping or cfg.method == "sr1" else None
        else:
            b_s = scale * (matrix @ s)
        if cfg.damping:
            y = _powell_damped(s, y, b_s)
        if inverse:
            h_y = scale * (matrix @ y)
        elif cfg.method == "sr1" or (cfg.method == "dfp" and cfg.initial_scaling is None):
            h_y = _solve(matrix, y) / scale
        else:
            h_y = None
        return b_s, h_y, y

    def update(updates, state: DenseQuasiNewtonState, params=None, **extra):
        del extra
        if params is None:
            raise TypeError(f"{who} needs params in update(updates, state, params) to form s")
        point = torch.stack(pm.flat_point(params, updates)).to(state.matrix.dtype)
        s, y = point - state.prev_point
        g = point[1]
        scale = initial_factor(state, s, y)
        b_s, h_y, y = products(state.matrix, scale, s, y)
        ok = state.has_prev & _accept(cfg, s, y, b_s, h_y)
        if cfg.method == "dfp" and cfg.initial_scaling is None:
            tau = _sizing(s, y, h_y, ok & state.scaled)
            if inverse:
                scale, h_y = scale * tau, h_y * tau
            else:
                scale, b_s = scale / tau, b_s / tau
        product = h_y if inverse else b_s
        matrix = dense_update(cfg.method, cfg.form, state.matrix, s, y, ok, scale, product)
        scaled = state.scaled | ok | (state.has_prev & _scalable(s, y))
        direction = -(matrix @ g) if inverse else -_solve(matrix, g)
        slope = g @ direction
        finite = torch.isfinite(slope)
        descent = finite & (slope < 0)
        repeated = state.ascent & _along(s, -state.prev_point[1])
        keep = descent if cfg.reset_on_ascent else finite & (descent | ~repeated)
        h0 = 1.0
        if cfg.initial_scaling is not None:
            h0 = cfg.initial_scaling if inverse else 1.0 / cfg.initial_scaling
        matrix = reset_where(matrix, keep, h0)
        direction = torch.where(descent, direction, -g)
        scaled = scaled & (keep | torch.full_like(scaled, cfg.initial_scaling is not None))
        gg = g @ g
        first = torch.clamp(torch.rsqrt(gg), max=1.0)
        hint = torch.where(~scaled & (gg > 0), first, torch.ones_like(first))
        new_state = DenseQuasiNewtonState(
            matrix, point, torch.ones_like(state.has_prev), scaled, hint, ~descent
        )
        like = tree.leaves(params)[0]
        return tree.unravel(direction.to(like.dtype), params), new_state

    def publish(state: DenseQuasiNewtonState, params=None, **extra) -> dict[str, Any]:
        del extra
        curvature = dense_curvature(state.matrix, params, inverse)
        return {"curvature": curvature, "step_hint": state.step_hint}

    return guarded(who, Transform(init, update, publish), DenseQuasiNewtonState)


def _make(
    method: str,
    memory_size: int | None,
    form: str,
    curvature_eps: float | None,
    initial_scaling: float | None,
    sr1_rtol: float | None = None,
    damping: bool = False,
    reset_on_ascent: bool = True,
) -> Transform:
    check_in(method, "form", form, FORMS)
    if curvature_eps is not None:
        check_nonnegative(method, "curvature_eps", curvature_eps)
    if initial_scaling is not None:
        check_positive(method, "initial_scaling", initial_scaling)
    if sr1_rtol is not None:
        check_interval(method, "sr1_rtol", sr1_rtol, 0, 1, include_low=True)
    cfg = _Config(method, form, curvature_eps, sr1_rtol, damping, initial_scaling, reset_on_ascent)
    if memory_size is None:
        return _dense(cfg, method)
    if damping:
        raise ValueError(
            f"{method}: Powell damping is available for the dense form only; drop "
            "memory_size or damping"
        )
    return limited_memory(
        method, memory_size, form, curvature_eps, initial_scaling, sr1_rtol, reset_on_ascent
    )


def bfgs(
    memory_size: int | None = None,
    *,
    form: str = "inverse",
    damping: bool = False,
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
) -> Transform:
    """The BFGS direction (N&W eqs. 6.17 / 6.19); limited memory with ``memory_size``.

    Args:
      memory_size: ``None`` for the dense ``n x n`` matrix, else the number of pairs of the
        compact representation (Byrd, Nocedal & Schnabel 1994).
      form: ``"inverse"`` (keep ``H``, direction ``-H g``) or ``"direct"`` (keep ``B``,
        direction by a solve).
      damping: Powell's damped update (N&W Procedure 18.2; dense only).
      curvature_eps: skip pairs with ``s^T y <= curvature_eps |s||y|`` (default: the dtype's
        machine epsilon).
      initial_scaling: fix ``H0 = initial_scaling * I`` (default: eq. 6.20, or eq. 7.20's
        newest-pair scaling in limited memory).

    Publishes ``curvature`` (``v -> B v``) and ``step_hint``.
    """
    return _make("bfgs", memory_size, form, curvature_eps, initial_scaling, damping=damping)


def dfp(
    memory_size: int | None = None,
    *,
    form: str = "inverse",
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
) -> Transform:
    """The DFP direction (N&W eqs. 6.13 / 6.15), sized (module docstring); args as :func:`bfgs`."""
    return _make("dfp", memory_size, form, curvature_eps, initial_scaling)


def sr1(
    memory_size: int | None = None,
    *,
    form: str = "inverse",
    sr1_rtol: float | None = None,
    initial_scaling: float | None = None,
    reset_on_ascent: bool = False,
) -> Transform:
    """The symmetric rank-one direction (N&W eqs. 6.24 / 6.25).

    A pair is used only when ``|s^T (y - B s)| > sr1_rtol |s| |y - B s|`` (eq. 6.26), and its dual
    ``|y^T (s - H y)| > sr1_rtol |y| |s - H y|``; ``sr1_rtol`` defaults to the square root
    of the dtype's machine epsilon (N&W's ``1e-8`` in float64, ``3.5e-4`` in float32). SR1
    matrices may be indefinite: where ``-H g`` is not a descent direction the direction is
    ``-g`` (a line search after it gets a descent direction) and the matrix is kept, so
    that ``chain(sr1(), trust_region())`` works as written: the trust region reads the
    published, possibly indefinite, curvature (N&W Algorithm 6.2), not the direction.
    ``reset_on_ascent=True`` also resets the matrix to ``H0`` there (the classic line-search
    safeguard; each reset throws the model away, so the next steps are steepest-descent
    steps). Non-finite directions always reset it, and so does (dense) a second ascent in a
    row after a step along ``-g`` (see the module docstring).
    """
    return _make(
        "sr1",
        memory_size,
        form,
        None,
        initial_scaling,
        sr1_rtol=sr1_rtol,
        reset_on_ascent=reset_on_ascent,
    )


def broyden(
    memory_size: int | None = None,
    *,
    form: str = "inverse",
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
    reset_on_ascent: bool = False,
) -> Transform:
    """Broyden's (good) nonsymmetric rank-one secant method applied to the gradient.

    ``B+ = B + (y - B s) s^T / s^T s`` (N&W eq. 11.24) or its Sherman-Morrison inverse.
    The matrix need not be symmetric or definite; a non-descent direction is replaced by
    ``-g`` and the matrix kept, unless ``reset_on_ascent=True`` (see :func:`sr1`).
    """
    return _make(
        "broyden",
        memory_size,
        form,
        curvature_eps,
        initial_scaling,
        reset_on_ascent=reset_on_ascent,
    )
