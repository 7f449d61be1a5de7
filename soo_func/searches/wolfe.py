"""Line search for the strong Wolfe conditions: bracketing, then zoom with safeguarded
cubic interpolation.

Nocedal & Wright, *Numerical Optimization*, 2nd ed.: the strong Wolfe conditions (3.7),
Algorithm 3.5 (bracketing), Algorithm 3.6 (zoom), the interpolation formulas (3.57) and
(3.59) and the initial step (3.60).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from soo_func.base import Transform, guarded, require_extras
from soo_func.checks import SYNC_FREE_SEARCHES, refuse_vmap
from soo_func.options import check_interval
from soo_func.searches.line import (
    LineSearchState,
    Ray,
    Start,
    Trial,
    check_extras,
    check_initial_step,
    check_max_steps,
    cubic_minimizer,
    finish,
    init_search_state,
    publish_search,
    quadratic_minimizer,
    read_start,
    resolve_alias,
    safeguard,
)

PyTree = Any

__all__ = ["wolfe"]

ZOOM_MARGIN = 0.1
"""A zoom trial stays this fraction of the bracket's width away from both of its ends."""

MIN_GROWTH, MAX_GROWTH = 2.0, 10.0
"""While bracketing, the next trial step is between these multiples of the current one."""

ROUNDING_ULPS = 16
"""Values within this many units of rounding (``eps |phi(0)|``) of ``phi(0)`` are a tie."""

NON_FINITE_SHRINK = 0.1
"""After a non-finite trial value, the step moves back to this fraction of its distance from the
last finite trial (overflowing objectives can need steps many orders of magnitude shorter)."""


def wolfe(
    slope_rtol: float | None = None,
    curvature_rtol: float | None = None,
    initial_step: str | float = "unit",
    max_steps: int = 30,
    *,
    c1: float | None = None,
    c2: float | None = None,
) -> Transform:
    """Strong Wolfe line search (Nocedal & Wright Algorithms 3.5 and 3.6).

    Along the direction ``d`` received as ``updates`` (``phi(alpha) = f(params + alpha d)``)
    it returns ``alpha * d`` for an ``alpha`` with

    * sufficient decrease: ``phi(alpha) <= phi(0) + c1 * alpha * phi'(0)``, and
    * strong curvature: ``|phi'(alpha)| <= c2 * |phi'(0)|``,

    where ``c1 = slope_rtol`` and ``c2 = curvature_rtol`` (``0 < c1 < c2 < 1``; defaults
    1e-4 and 0.9, use ``c2 = 0.1`` for nonlinear CG). ``c1=`` and ``c2=`` are accepted as
    aliases.

    Bracketing (Alg. 3.5) tries the initial step, then grows it to the minimizer of the
    cubic through the last two trials (eq. (3.59)), kept in ``[2, 10]`` times the current
    step (10 times when the cubic has no minimizer: nothing points to one nearby, as when
    a tiny first step sees the line as linear to rounding), until a trial fails sufficient
    decrease, does not lower the value, or has a non-negative slope: that brackets an
    acceptable step. Zoom (Alg. 3.6) then tries the cubic interpolant's minimizer (the
    quadratic (3.57) when the cubic has none, else the midpoint), at least 10% of the
    bracket's width from either end.

    Where rounding hides the decrease (near a minimizer: the linear model's decrease
    ``alpha |phi'(0)|`` is below ``16 eps |phi(0)|``), a trial whose value ties ``phi(0)`` to
    that rounding and that meets the curvature condition is accepted: Hager & Zhang's
    approximate Wolfe conditions (SIAM J. Optim. 16, 2005), which let the gradient keep
    shrinking after the values stop resolving it.

    A non-finite trial value or slope marks an upper limit on the step: while bracketing the
    step moves back to a tenth of its distance from the last finite trial (and later growth
    stays below the limit); while zooming it becomes the bracket's far end (and the next
    trial is the midpoint).

    Every trial evaluates the value and gradient (``soo_func.oracles.value_and_grad``),
    and the accepted one is handed on (``next_value``, ``next_grad``): no point is evaluated
    twice. Host syncs: one to read ``phi(0)``, ``phi'(0)``, and one per trial
    (``state.num_syncs``).

    Failure (``search_failed`` true): an ascent or zero direction (``phi'(0) >= 0``), or a
    non-finite slope, gives a zero step; after ``max_steps`` trials it returns the lowest
    trial that satisfied sufficient decrease (which is below ``phi(0)``), or a zero step.

    Args:
      slope_rtol: ``c1``, in (0, curvature_rtol); default 1e-4.
      curvature_rtol: ``c2``, in (slope_rtol, 1); default 0.9.
      initial_step: ``"unit"`` (1; Newton and quasi-Newton), ``"previous_decrease"`` (N&W
        eq. (3.60), capped at 1; nonlinear CG and gradient descent) or a positive number. An
        ``step_hint`` 0-d tensor published upstream takes precedence.
      max_steps: the most trial evaluations per update.
      c1, c2: aliases of ``slope_rtol`` and ``curvature_rtol``.

    Needs the extras ``value``, ``grad`` and ``value_fn``; publishes ``next_value``,
    ``next_grad``, ``next_value_fn``, ``search_failed``, ``step_size``,
    ``num_search_evals`` and ``num_search_grads``.
    """
    c1 = resolve_alias("wolfe", "slope_rtol", slope_rtol, "c1", c1, 1e-4)
    c2 = resolve_alias("wolfe", "curvature_rtol", curvature_rtol, "c2", c2, 0.9)
    check_interval("wolfe", "slope_rtol (c1)", c1, 0, 1)
    check_interval("wolfe", "curvature_rtol (c2)", c2, 0, 1)
    if not c1 < c2:
        raise ValueError(
            f"wolfe: need 0 < slope_rtol (c1) < curvature_rtol (c2) < 1, got c1={c1}, c2={c2}"
        )
    max_steps = check_max_steps("wolfe", max_steps)
    initial_step = check_initial_step("wolfe", initial_step)

    def search(ray: Ray, start: Start, origin: Trial) -> tuple[Trial | None, bool]:
        f0, df0 = start.value, start.slope
        eps = torch.finfo(origin.value_tensor.dtype).eps
        rounding = ROUNDING_ULPS * eps * abs(f0)

        def sufficient(t: Trial) -> bool:
            return t.finite and t.value <= f0 + c1 * t.alpha * df0

        def curvature(t: Trial) -> bool:
            return abs(t.slope) <= -c2 * df0

        def approximately_wolfe(t: Trial) -> bool:
            # Hager & Zhang (2005) approximate Wolfe, where rounding hides the decrease:
            # the linear model's decrease alpha |phi'(0)| is below the rounding of phi(0)
            # and phi(alpha) ties phi(0); the slope condition then decides.
            return (
                t.finite
                and -t.alpha * df0 <= rounding
                and t.value <= f0 + rounding
                and curvature(t)
            )

        def zoom(lo: Trial, hi: Trial) -> tuple[Trial | None, bool]:
            while ray.num_evals < max_steps:
                a, b = lo.alpha, hi.alpha
                width = abs(b - a)
                if width <= 1e-15 * max(a, b):
                    break  # the bracket has collapsed to rounding level
                candidate = math.nan
                if hi.finite:
                    candidate = cubic_minimizer(a, lo.value, lo.slope, b, hi.value, hi.slope)
                    if math.isnan(candidate):
                        candidate = quadratic_minimizer(a, lo.value, lo.slope, b, hi.value)
                left, right = min(a, b) + ZOOM_MARGIN * width, max(a, b) - ZOOM_MARGIN * width
                t = ray.value_and_slope(safeguard(candidate, left, right, 0.5 * (a + b)))
                if approximately_wolfe(t):
                    return t, False
                if not sufficient(t) or t.value >= lo.value:
                    hi = t
                    continue
                if curvature(t):
                    return t, False
                if t.slope * (hi.alpha - lo.alpha) >= 0:
                    hi = lo
                lo = t
            return (lo if lo.alpha > 0 else None), True

        previous, alpha = origin, start.initial_step
        upper = math.inf  # the smallest step seen with a non-finite value or slope
        while ray.num_evals < max_steps:
            t = ray.value_and_slope(alpha)
            if not t.finite:
                upper = alpha
                alpha = previous.alpha + NON_FINITE_SHRINK * (alpha - previous.alpha)
                continue
            if approximately_wolfe(t):
                return t, False
            if not sufficient(t) or (previous.alpha > 0 and t.value >= previous.value):
                return zoom(previous, t)
            if curvature(t):
                return t, False
            if t.slope >= 0:
                return zoom(t, previous)
            candidate = cubic_minimizer(
                previous.alpha, previous.value, previous.slope, t.alpha, t.value, t.slope
            )
            alpha = safeguard(candidate, MIN_GROWTH * alpha, MAX_GROWTH * alpha, MAX_GROWTH * alpha)
            if math.isfinite(upper):
                alpha = min(alpha, t.alpha + 0.5 * (upper - t.alpha))
            previous = t
        return (previous if previous.alpha > 0 else None), True

    def update(updates: PyTree, state: LineSearchState, params: PyTree = None, **extra: Any):
        require_extras("wolfe", extra, "value", "grad", "value_fn")
        if params is None:
            raise TypeError("wolfe needs params in update(updates, state, params, ...)")
        check_extras("wolfe", updates, state, extra)
        refuse_vmap("wolfe", "each trial's value", SYNC_FREE_SEARCHES)
        value, grad = extra["value"], extra["grad"]
        ray = Ray(extra["value_fn"], params, updates)
        start = read_start(ray, value, grad, state, initial_step, extra.get("step_hint"))
        descent = math.isfinite(start.value) and math.isfinite(start.slope) and start.slope < 0
        if not descent:
            return finish(ray, state, value, grad, None, True)
        origin = Trial(0.0, start.value, start.slope, value, grad)
        accepted, failed = search(ray, start, origin)
        return finish(ray, state, value, grad, accepted, failed)

    return guarded("wolfe", Transform(init_search_state, update, publish_search), LineSearchState)
