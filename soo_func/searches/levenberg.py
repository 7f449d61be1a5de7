"""Levenberg and Levenberg-Marquardt: damped Gauss-Newton (or Newton) steps, one trial each.

Each update solves the damped model system ``(B + lam D) p = -g``
(:mod:`soo_func.searches.damped_gauss_newton`), evaluates the trial point ``x + p`` once
and accepts it when the gain ratio ``rho = (f(x) - f(x + p)) / (m(0) - m(p))`` exceeds
``accept_ratio`` (:mod:`soo_func.searches.acceptance`, shared with the trust region). The
damping ``lam`` then follows Nielsen's rule or the classic multiply/divide rule
(:mod:`soo_func.searches.damping`), or comes from Moré's trust radius on ``|D^(1/2) p|``
(``damping_rule="more"``, MINPACK's ``lmder``: :mod:`soo_func.searches.more_radius`).
References: Levenberg (1944), Marquardt (1963), Moré (1978) "The Levenberg-Marquardt
algorithm: implementation and theory", Nocedal & Wright, *Numerical Optimization*, 2nd
ed., section 10.3, Madsen, Nielsen & Tingleff (2004) *Methods for Non-Linear Least
Squares Problems*, §3.2 (Algorithm 3.16).

The model ``B`` is, in order of preference:

1. ``curvature`` published by an upstream direction (``chain(newton_krylov(),
   levenberg())`` damps the Newton model, ``chain(gauss_newton(), levenberg())`` the
   Gauss-Newton one);
2. ``J^T J`` from the ``residual_fn`` extra (least squares, loss ``0.5 |r|^2``);
3. the Hessian of ``value_fn`` (Hessian-vector products), for general losses.

``D = I`` for :func:`levenberg`; ``D = diag(J^T J)`` for :func:`levenberg_marquardt`,
kept as the running maximum over the iterations (Moré 1978, eq. (6.3)) and floored at
``eps * max(D)`` so that a zero column never makes the system singular.

Modes (the state's ``mode``, :data:`~soo_func.searches.levenberg_options.MODES`), chosen
on the host from the shapes, so that nothing larger than a few m x n arrays is ever held
and the m x n Jacobian only when it fits ``max_jacobian_bytes``:

* ``"dense"`` / ``"dense_chunked"``: the Jacobian (:mod:`soo_func.searches.levenberg_jacobian`:
  ``n`` ``jvp``s by columns when ``n <= m``, ``m`` ``vjp``s by rows when ``m < n``; in one
  ``vmap``, or in chunks of ``chunk_size`` basis vectors so that the peak is ``J`` plus one
  chunk's work) and a direct solve of ``min |J p + r|^2 + lam <p, D p>``
  (:func:`~soo_func.searches.damped_gauss_newton.solve_damped_dense`). For ``m >= n`` the
  QR of ``[J; sqrt(lam D)]`` ((m + n) x n, N&W eq. (10.34)), never ``J^T J``. For
  ``m < n`` (more parameters than residuals, a PINN) the n x n forms are avoided: with
  ``J D^(-1/2) = R^T Q^T`` (QR of the n x m transpose) every solution lies in the range of
  ``Q`` and the problem shrinks to the m x m ``min |R^T y + r|^2 + lam |y|^2``,
  ``p = D^(-1/2) Q y`` (the push-through identity ``(A^T A + lam I)^(-1) A^T = A^T (A A^T
  + lam I)^(-1)``: the m x m system ``J D^-1 J^T + lam I``, solved without forming it).
  Moré's rule uses the thin SVD of ``J D^(-1/2)`` (min(m, n) singular triplets, Moré 1978
  §3, N&W section 10.3).
* ``"matrix_free"``: CG on the damped normal equations, each product ``J^T (J v)`` one GGN
  product (``jvp`` and ``vjp``). Marquardt's ``diag(J^T J)`` has no cheap matrix-free
  route: it is accumulated from the Jacobian a chunk at a time, never storing ``J``
  (``min(m, n)`` products per step): for large ``n`` :func:`levenberg` (``D = I``) is
  cheaper.

``solver="auto"`` (default) takes a dense mode for least squares when the m x n Jacobian
fits ``max_jacobian_bytes`` (default: a fraction of the device's available memory, read
once per device and process: :func:`~soo_func.searches.levenberg_jacobian.default_max_jacobian_bytes`)
and, for :func:`levenberg`, ``n <= dense_max_params``; ``levenberg_marquardt`` has no
parameter limit by default (its matrix-free mode forms the Jacobian's columns anyway).
``m`` is remembered per residual function once a Jacobian of it is built (the first chunk
of a new one tells it), so that choosing costs no evaluation.
``"dense"`` and ``"cg"`` force a mode.

Counting: a Jacobian column (a ``jvp``) or row (a ``vjp``) and a GGN product ``J^T J v`` are
one Hessian product each to the driver's ``CountedObjective``, a residual evaluation one
value. The dense solver evaluates the Jacobian at each trial point (``min(m, n)`` products
and one residual evaluation, which give the trial's ``0.5 |r|^2`` and ``J^T r``) and keeps
it for the next update (:mod:`soo_func.searches.jacobian_cache`, keyed on the point and the
residual function): a step costs ``min(m, n) + 1``, accepted or not (MINPACK: 1 per trial,
``n`` per accepted step). The matrix-free modes evaluate the trial with
``value_and_grad``. Host syncs: dense mode one per update (is the cached Jacobian the one
at ``params``?), none when the caller passes ``continues=True`` (the sync-free driver from
its second step: the cache is then at ``params`` by construction); acceptance is a
``torch.where``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.searches.acceptance import accept_or_stay, gain_ratio
from soo_func.searches.jacobian_cache import JacobianCache, empty_jacobian_cache, store
from soo_func.searches.levenberg_options import MODES, LevenbergOptions
from soo_func.searches.levenberg_update import (
    dense_trial,
    jacobian_budget,
    make_plan,
    matrix_free_trial,
    next_damping,
    read_point,
    search_failed,
)

PyTree = Any

__all__ = [
    "LevenbergOptions",
    "LevenbergState",
    "levenberg",
    "levenberg_marquardt",
    "levenberg_mode",
]


class LevenbergState(NamedTuple):
    """State of :func:`levenberg` / :func:`levenberg_marquardt` (all 0-d unless noted).

    ``damping`` is negative before the first update (then it is set from ``tau``);
    ``nu`` is Nielsen's growth factor; ``damping_diag`` is Marquardt's running ``diag(J^T J)``
    (a pytree like the params; ones for Levenberg); ``next_value``/``next_grad`` are the
    objective and gradient at ``params + updates`` (at ``params`` after a rejection);
    ``jacobian_cache`` the dense solver's Jacobian and residuals, with the point and the
    residual function they belong to; ``radius`` Moré's bound on ``|D^(1/2) p|``
    (negative before the first update with that rule); ``mode`` (int8) the solver the last
    update used, an index into :data:`~soo_func.searches.levenberg_options.MODES`
    (``"dense"``, ``"dense_chunked"``, ``"matrix_free"``; -1 before the first update):
    :func:`levenberg_mode` names it.
    """

    damping: torch.Tensor
    nu: torch.Tensor
    ratio: torch.Tensor
    step_accepted: torch.Tensor
    search_failed: torch.Tensor
    next_value: torch.Tensor
    next_grad: PyTree
    damping_diag: PyTree
    jacobian_cache: JacobianCache
    radius: torch.Tensor
    mode: torch.Tensor


def _make(who: str, marquardt: bool, options: LevenbergOptions) -> Transform:
    options.check(who)

    def init(params: PyTree) -> LevenbergState:
        jacobian_budget(options, params)  # the device's default budget, read once here
        like = tree.leaves(params)[0]
        scalar = {"dtype": like.dtype, "device": like.device}
        return LevenbergState(
            damping=torch.full((), -1.0, **scalar),
            nu=torch.full((), 2.0, **scalar),
            ratio=torch.zeros((), **scalar),
            step_accepted=torch.zeros((), dtype=torch.bool, device=like.device),
            search_failed=torch.zeros((), dtype=torch.bool, device=like.device),
            next_value=torch.zeros((), **scalar),
            next_grad=tree.zeros_like(params),
            damping_diag=tree.zeros_like(params) if marquardt else tree.ones_like(params),
            jacobian_cache=empty_jacobian_cache(params),
            radius=torch.full((), -1.0, **scalar),
            mode=torch.full((), -1, dtype=torch.int8, device=like.device),
        )

    def update(updates: PyTree, state: LevenbergState, params=None, **extra):
        """One damped step; ``updates`` (an upstream direction) is not used: the step
        solves the damped model, which an upstream direction enters as ``curvature``."""
        point = read_point(who, marquardt, params, extra)
        plan = make_plan(who, options, point, params, state.jacobian_cache)
        if plan.dense:
            trial = dense_trial(
                options, marquardt, params, point, plan.rule == "more", current=plan.current,
                damping=state.damping, damping_diag=state.damping_diag, radius=state.radius,
            )  # fmt: skip
        else:
            trial = matrix_free_trial(
                options, marquardt, params, point,
                damping=state.damping, damping_diag=state.damping_diag,
            )  # fmt: skip
        model = trial.model
        ratio = gain_ratio(point.value - trial.value, model.predicted)
        ratio = torch.where(model.valid, ratio, torch.full_like(ratio, -torch.inf))
        accepted = ratio > options.accept_ratio
        new, radius = next_damping(
            options, plan.rule, trial, ratio, accepted, point.value,
            nu=state.nu, radius=state.radius,
        )  # fmt: skip
        damping = torch.clamp(new.damping, options.min_damping, options.max_damping)
        decision = accept_or_stay(
            accepted, model.step, trial.value, trial.grad, point.value, point.grad
        )
        cache = state.jacobian_cache
        if trial.jacobians is not None:
            cache = store(accepted, *trial.jacobians)
        new_state = LevenbergState(
            damping=damping,
            nu=new.nu,
            ratio=ratio,
            step_accepted=accepted,
            search_failed=search_failed(
                options, plan.rule, params, model, accepted, damping, radius
            ),
            next_value=decision.next_value,
            next_grad=decision.next_grad,
            damping_diag=model.damping_diag,
            jacobian_cache=cache,
            radius=radius,
            mode=torch.full_like(state.mode, MODES.index(plan.mode)),
        )
        return decision.step, new_state

    def publish(state: LevenbergState, params=None, **extra) -> dict[str, Any]:
        return {
            "next_value": state.next_value,
            "next_grad": state.next_grad,
            "next_value_fn": extra.get("value_fn"),
            "damping": state.damping,
            "ratio": state.ratio,
            "step_accepted": state.step_accepted,
            "search_failed": state.search_failed,
        }

    return guarded(who, Transform(init, update, publish), LevenbergState)


def levenberg_mode(state: LevenbergState) -> str | None:
    """The name of the mode the last update used (``None`` before the first): one of
    :data:`~soo_func.searches.levenberg_options.MODES`. One host read."""
    code = int(state.mode)
    return None if code < 0 else MODES[code]


def levenberg(
    *,
    tau: float = 1e-3,
    initial_damping: float | None = None,
    accept_ratio: float = 1e-4,
    damping_rule: str = "nielsen",
    increase_factor: float = 10.0,
    decrease_factor: float = 10.0,
    min_damping: float = 1e-20,
    max_damping: float = 1e20,
    solver: str = "auto",
    dense_max_params: int | None = 200,
    cg_rtol: float = 1e-6,
    step_rtol: float = 1e-14,
    max_jacobian_bytes: int | None = None,
    chunk_size: int | None = None,
) -> Transform:
    """Levenberg's method: ``(B + lam I) p = -g`` with gain-ratio damping control.

    Args:
      tau: the first damping is ``tau * max_i (J^T J)_ii`` (MNT eq. (3.14)); in the
        matrix-free modes ``tau * |<g, B g>| / |g|^2`` (a Rayleigh quotient of ``B``).
      initial_damping: a fixed first damping instead of the ``tau`` rule.
      accept_ratio: accept the trial point when ``rho > accept_ratio``.
      damping_rule: ``"nielsen"`` (default), ``"multiply"`` (``lam / decrease_factor``
        on acceptance, ``lam * increase_factor`` on rejection), ``"more"`` (Moré's
        trust radius, dense least squares only; ``tau``, ``initial_damping`` and the
        factors are then unused) or ``"auto"`` (``"more"`` with the dense solver, else
        ``"nielsen"``).
      min_damping, max_damping: bounds on ``lam``; reaching ``max_damping`` on a rejected
        step publishes ``search_failed``.
      solver: ``"auto"`` (the module docstring's modes), ``"dense"`` (the Jacobian,
        least squares only, whatever its size) or ``"cg"`` (matrix-free).
      dense_max_params: ``"auto"`` uses the Jacobian up to this many parameters
        (``None``: any number that fits ``max_jacobian_bytes``).
      cg_rtol: relative residual tolerance of the CG solve.
      step_rtol: a rejected step shorter than ``step_rtol * (|x| + step_rtol)`` means no
        progress is possible at working precision: ``search_failed`` is published.
      max_jacobian_bytes: ``"auto"`` forms the m x n Jacobian only when it takes at most
        this many bytes (``None``: ``BUDGET_FRACTION`` of the device's available memory,
        :func:`~soo_func.searches.levenberg_jacobian.default_max_jacobian_bytes`).
      chunk_size: basis vectors pushed through the residuals at once when the Jacobian is
        built (``None``: as many as make ``chunk_size * m <= CHUNK_ROWS``); the peak
        memory is the Jacobian plus one chunk's work.

    Needs ``value_fn`` (and ``residual_fn`` for the least-squares model); publishes
    ``next_value``, ``next_grad``, ``next_value_fn``, ``damping``, ``ratio``,
    ``step_accepted`` and ``search_failed``. The incoming updates are not used. The
    state's ``mode`` tells the solver used (:func:`levenberg_mode`).
    """
    options = LevenbergOptions(
        tau=tau, initial_damping=initial_damping, accept_ratio=accept_ratio,
        damping_rule=damping_rule, increase_factor=increase_factor,
        decrease_factor=decrease_factor, min_damping=min_damping, max_damping=max_damping,
        solver=solver, dense_max_params=dense_max_params, cg_rtol=cg_rtol, step_rtol=step_rtol,
        max_jacobian_bytes=max_jacobian_bytes, chunk_size=chunk_size,
    )  # fmt: skip
    return _make("levenberg", False, options)


def levenberg_marquardt(
    *,
    tau: float = 1e-3,
    initial_damping: float | None = None,
    accept_ratio: float = 1e-4,
    damping_rule: str = "auto",
    increase_factor: float = 10.0,
    decrease_factor: float = 10.0,
    min_damping: float = 1e-20,
    max_damping: float = 1e20,
    solver: str = "auto",
    dense_max_params: int | None = None,
    cg_rtol: float = 1e-6,
    step_rtol: float = 1e-14,
    max_jacobian_bytes: int | None = None,
    chunk_size: int | None = None,
) -> Transform:
    """Levenberg-Marquardt: ``(J^T J + lam D) p = -J^T r`` with ``D = diag(J^T J)``
    (running maximum, Moré 1978), for least squares (needs the ``residual_fn`` extra).

    By default (``damping_rule="auto"``) the dense solver takes Moré's trust-region
    control of ``lam`` (MINPACK ``lmder``), the matrix-free one Nielsen's rule, where the
    damping is relative to the damping diagonal ``D``, so the first one is ``tau`` itself (or
    ``initial_damping``). The other arguments are those of :func:`levenberg`. This is
    the default optimizer of :func:`soo_func.least_squares`. With Moré's rule the state's
    ``radius`` is the bound on ``|D^(1/2) p|`` and the published ``damping`` the last
    ``lam``.

    Mode: ``D`` needs every column of ``J`` in every mode, so ``"auto"`` forms the Jacobian
    whenever it fits ``max_jacobian_bytes`` (``dense_max_params=None``), in chunks when one
    ``vmap`` over all basis vectors would hold more than ``CHUNK_ROWS`` rows of work, and
    solves with it by the QR of ``[J; sqrt(lam D)]`` (``m >= n``), the m x m reduced form
    (``m < n``) or Moré's SVD; beyond the budget it is matrix-free (CG, ``D`` accumulated
    chunk by chunk). The state's ``mode`` names the choice (:func:`levenberg_mode`).
    """
    options = LevenbergOptions(
        tau=tau, initial_damping=initial_damping, accept_ratio=accept_ratio,
        damping_rule=damping_rule, increase_factor=increase_factor,
        decrease_factor=decrease_factor, min_damping=min_damping, max_damping=max_damping,
        solver=solver, dense_max_params=dense_max_params, cg_rtol=cg_rtol, step_rtol=step_rtol,
        max_jacobian_bytes=max_jacobian_bytes, chunk_size=chunk_size,
    )  # fmt: skip
    return _make("levenberg_marquardt", True, options)
