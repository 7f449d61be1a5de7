"""Backtracking line search with the Armijo (sufficient decrease) condition.

Nocedal & Wright, *Numerical Optimization*, 2nd ed.: Algorithm 3.1 (backtracking), the
sufficient decrease condition (3.4) and the interpolation of section 3.5.
"""

from __future__ import annotations

import math
from typing import Any

from soo_func.base import Transform, require_extras
from soo_func.searches.line import (
    LineSearchState,
    Ray,
    Start,
    Trial,
    check_extras,
    check_initial_step,
    check_max_steps,
    cubic_minimizer_from_values,
    finish,
    init_search_state,
    publish_search,
    quadratic_minimizer,
    read_start,
    resolve_alias,
    safeguard,
)

PyTree = Any

__all__ = ["armijo"]


def first_was_accepted(start: Start) -> bool:
    """Whether the previous update accepted its first trial (true before the first update):
    then it evaluated one point with its gradient, or one value and then that point again
    with its gradient."""
    evals, grads = start.previous_evals, start.previous_grads
    return evals <= 1 or (evals == 2 and grads == 1)


def armijo(
    slope_rtol: float | None = None,
    min_shrink: float = 0.1,
    max_shrink: float = 0.5,
    max_steps: int = 30,
    initial_step: str | float = "unit",
    *,
    c1: float | None = None,
) -> Transform:
    """Backtracking line search: the first ``alpha`` in a shrinking sequence with
    ``phi(alpha) <= phi(0) + slope_rtol * alpha * phi'(0)`` (N&W eq. (3.4), Algorithm 3.1).

    ``phi(alpha) = f(params + alpha d)`` along the direction ``d`` it receives as
    ``updates``; it returns ``alpha * d``. After a rejected trial the next step is the
    minimizer of the quadratic through ``phi(0), phi'(0), phi(alpha)`` (N&W eq. (3.57)),
    then of the cubic through the last two trials (eq. (3.58)), kept in
    ``[min_shrink * alpha, max_shrink * alpha]`` (a non-finite trial value shrinks by
    ``min_shrink``: overflowing objectives can need steps many orders of magnitude shorter).

    Evaluations: trials evaluate the value only, and the accepted one is then evaluated
    with its gradient (its value is computed twice), except that the first trial is
    evaluated with its gradient when the previous update accepted its first trial (or
    before the first update): a scaled quasi-Newton or Newton step is usually accepted at
    once, and then no point is evaluated twice; with steepest descent the first trial is
    usually rejected, and no gradient is wasted on it.
    Host syncs: one to read ``phi(0)``, ``phi'(0)``, one per trial (``state.num_syncs``).

    Failure (``search_failed`` true, the state stays consistent): an ascent or zero
    direction (``phi'(0) >= 0``) or a non-finite slope gives a zero step; after
    ``max_steps`` trials without sufficient decrease it returns the lowest trial below
    ``phi(0)``, or a zero step when there is none.

    Args:
      slope_rtol: ``c1`` of the Armijo condition, in (0, 1); default 1e-4.
      min_shrink: the smallest factor a rejected step is multiplied by, in (0, max_shrink].
      max_shrink: the largest such factor, in [min_shrink, 1).
      max_steps: the most trial evaluations per update.
      initial_step: ``"unit"`` (1), ``"previous_decrease"`` (N&W eq. (3.60)) or a positive
        number; an ``initial_step`` 0-d tensor published upstream takes precedence.
      c1: alias of ``slope_rtol``.

    Needs the extras ``value``, ``grad`` and ``value_fn``; publishes ``next_value``,
    ``next_grad``, ``next_value_fn``, ``search_failed``, ``step_size``,
    ``num_search_evals`` and ``num_search_grads``.
    """
    slope_rtol = resolve_alias("armijo", "slope_rtol", slope_rtol, "c1", c1, 1e-4)
    if not 0 < slope_rtol < 1:
        raise ValueError(f"armijo: slope_rtol (c1) must be in (0, 1), got {slope_rtol}")
    if not 0 < min_shrink <= max_shrink < 1:
        raise ValueError(
            "armijo: need 0 < min_shrink <= max_shrink < 1, got "
            f"min_shrink={min_shrink}, max_shrink={max_shrink}"
        )
    max_steps = check_max_steps("armijo", max_steps)
    initial_step = check_initial_step("armijo", initial_step)

    def backtrack(ray: Ray, start: Start) -> tuple[Trial | None, bool]:
        f0, slope = start.value, start.slope
        alpha = start.initial_step
        best: Trial | None = None
        previous: Trial | None = None
        for i in range(max_steps):
            with_grad = i == 0 and first_was_accepted(start)
            trial = ray.value_and_slope(alpha) if with_grad else ray.value(alpha)
            if trial.finite and trial.value <= f0 + slope_rtol * alpha * slope:
                return trial, False
            if trial.finite and trial.value < f0 and (best is None or trial.value < best.value):
                best = trial
            shortest, longest = min_shrink * alpha, max_shrink * alpha
            if not trial.finite:
                candidate = shortest
            elif previous is None:
                candidate = quadratic_minimizer(0.0, f0, slope, alpha, trial.value)
            else:
                candidate = cubic_minimizer_from_values(
                    f0, slope, previous.alpha, previous.value, alpha, trial.value
                )
                if math.isnan(candidate):
                    candidate = quadratic_minimizer(0.0, f0, slope, alpha, trial.value)
            if trial.finite:
                previous = trial
            alpha = safeguard(candidate, shortest, longest, longest)
        return best, True

    def update(updates: PyTree, state: LineSearchState, params: PyTree = None, **extra: Any):
        require_extras("armijo", extra, "value", "grad", "value_fn")
        if params is None:
            raise TypeError("armijo needs params in update(updates, state, params, ...)")
        check_extras("armijo", updates, state, extra)
        ray = Ray(extra["value_fn"], params, updates)
        start = read_start(
            ray, extra["value"], extra["grad"], state, initial_step, extra.get("initial_step")
        )
        descent = math.isfinite(start.value) and math.isfinite(start.slope) and start.slope < 0
        if not descent:
            return finish(ray, state, extra["value"], extra["grad"], None, True)
        accepted, failed = backtrack(ray, start)
        if accepted is not None and accepted.grad is None:
            accepted = ray.value_and_slope(accepted.alpha)
        return finish(ray, state, extra["value"], extra["grad"], accepted, failed)

    return Transform(init_search_state, update, publish_search)
