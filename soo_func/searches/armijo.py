"""Backtracking line search with the Armijo (sufficient decrease) condition.

Nocedal & Wright, *Numerical Optimization*, 2nd ed.: Algorithm 3.1 (backtracking), the
sufficient decrease condition (3.4) and the interpolation of section 3.5.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from soo_func import tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.checks import SYNC_FREE_SEARCHES, refuse_vmap
from soo_func.options import check_interval
from soo_func.oracles import value_and_grad
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
from soo_func.searches.sync_free_backtrack import (
    Found,
    compiled_search,
    compiles_control_flow,
    next_trial,
)

PyTree = Any

__all__ = ["armijo", "armijo_sync_free", "compiles_control_flow"]


def _checked_options(
    who: str,
    slope_rtol: float | None,
    c1: float | None,
    min_shrink: float,
    max_shrink: float,
    max_steps: int,
    initial_step: Any,
) -> tuple[float, int, Any]:
    """Validate the arguments shared by :func:`armijo` and :func:`armijo_sync_free`."""
    slope_rtol = resolve_alias(who, "slope_rtol", slope_rtol, "c1", c1, 1e-4)
    check_interval(who, "slope_rtol (c1)", slope_rtol, 0, 1)
    check_interval(who, "min_shrink", min_shrink, 0, 1)
    check_interval(who, "max_shrink", max_shrink, 0, 1)
    if not min_shrink <= max_shrink:
        raise ValueError(
            f"{who}: need 0 < min_shrink <= max_shrink < 1, got "
            f"min_shrink={min_shrink}, max_shrink={max_shrink}"
        )
    return slope_rtol, check_max_steps(who, max_steps), check_initial_step(who, initial_step)


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
        number; a ``step_hint`` 0-d tensor published upstream takes precedence.
      c1: alias of ``slope_rtol``.

    Needs the extras ``value``, ``grad`` and ``value_fn``; publishes ``next_value``,
    ``next_grad``, ``next_value_fn``, ``search_failed``, ``step_size``,
    ``num_search_evals`` and ``num_search_grads``.
    """
    slope_rtol, max_steps, initial_step = _checked_options(
        "armijo", slope_rtol, c1, min_shrink, max_shrink, max_steps, initial_step
    )

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
        refuse_vmap("armijo", "each trial's value", SYNC_FREE_SEARCHES)
        ray = Ray(extra["value_fn"], params, updates)
        start = read_start(
            ray, extra["value"], extra["grad"], state, initial_step, extra.get("step_hint")
        )
        descent = math.isfinite(start.value) and math.isfinite(start.slope) and start.slope < 0
        if not descent:
            return finish(ray, state, extra["value"], extra["grad"], None, True)
        accepted, failed = backtrack(ray, start)
        if accepted is not None and accepted.grad is None:
            accepted = ray.value_and_slope(accepted.alpha)
        return finish(ray, state, extra["value"], extra["grad"], accepted, failed)

    return guarded("armijo", Transform(init_search_state, update, publish_search), LineSearchState)


def _initial_step_tensor(
    initial_step: str | float,
    value: torch.Tensor,
    slope: torch.Tensor,
    grad: PyTree,
    state: LineSearchState,
    published_step: Any,
) -> torch.Tensor:
    """The first trial step as a 0-d tensor (the rules of ``line.read_start``, no sync)."""
    one = torch.ones_like(slope)
    if initial_step == "unit":
        alpha0 = one
    elif initial_step == "previous_decrease":
        previous = state.previous_value.to(slope)
        from_previous = 2.0 * (value.to(slope) - previous) / slope
        first = tree.norm(grad).to(slope) / slope.abs()
        alpha0 = torch.where(torch.isfinite(previous), from_previous, first)
        alpha0 = torch.where(torch.isfinite(alpha0) & (alpha0 > 0), alpha0.clamp(max=1.0), one)
    else:
        alpha0 = one * initial_step
    if isinstance(published_step, torch.Tensor) and published_step.numel() == 1:
        hint = published_step.detach().reshape(()).to(slope)
        alpha0 = torch.where(torch.isfinite(hint) & (hint > 0), hint, alpha0)
    return alpha0


def armijo_sync_free(
    slope_rtol: float | None = None,
    min_shrink: float = 0.1,
    max_shrink: float = 0.5,
    max_steps: int = 8,
    initial_step: str | float = "unit",
    *,
    c1: float | None = None,
) -> Transform:
    """Backtracking for the Armijo condition without host synchronisation.

    The same acceptance rule as :func:`armijo` (N&W eq. (3.4)) and the same safeguarded
    quadratic interpolation (eq. (3.57), between ``min_shrink`` and ``max_shrink`` times
    the last trial; a non-finite value shrinks by ``min_shrink``), decided on the device.

    Eager (and under ``torch.func.vmap``) it uses ``torch.where``: all ``max_steps`` trial
    values are evaluated (the search cannot stop early without reading a value on the
    host), the first trial that satisfies the condition is kept, and its value and
    gradient are evaluated once. So an update costs ``max_steps + 1`` values and one
    gradient, and never waits for the device (``state.num_syncs`` stays 0).

    Under ``torch.compile`` the trials are nested ``torch.cond`` (:mod:`~soo_func.searches.sync_free_backtrack`):
    the first trial is evaluated with its gradient and each later one only when the
    previous was rejected, so a step whose first trial is accepted costs one
    ``value_and_grad``, as with :func:`armijo`; ``num_search_evals`` and
    ``num_search_grads`` hold the evaluations made, also published as ``uncharged_evals``
    (the sync-free driver adds them). Both paths accept the same step, value and gradient.

    Failure (``search_failed``, a zero step, the start's value and gradient handed on): an
    ascent, zero or non-finite direction, or no trial with sufficient decrease. Unlike
    :func:`armijo` it does not fall back to the best decreasing trial. Arguments as for
    :func:`armijo`.
    """
    slope_rtol, max_steps, initial_step = _checked_options(
        "armijo_sync_free", slope_rtol, c1, min_shrink, max_shrink, max_steps, initial_step
    )
    options = (slope_rtol, min_shrink, max_shrink, max_steps)

    def all_trials(value_fn, params, updates, grad, f0, slope, alpha, ok_start) -> Found:
        """Every trial by value, then ``value_and_grad`` at the accepted one (or at params)."""
        accepted = torch.zeros_like(alpha)
        found = torch.zeros((), dtype=torch.bool, device=f0.device)
        for _ in range(max_steps):
            with torch.no_grad():
                f = value_fn(tree.add(params, tree.scale(alpha, updates))).detach().reshape(())
            good = ok_start & ~found & torch.isfinite(f) & (f <= f0 + slope_rtol * alpha * slope)
            accepted = torch.where(good, alpha, accepted)
            found = found | good
            alpha = next_trial(f, alpha, f0, slope, min_shrink, max_shrink)
        step = tree.where(found, tree.scale(accepted, updates), tree.zeros_like(updates))
        new_value, new_grad = value_and_grad(value_fn)(tree.add(params, step))
        count = torch.full((), max_steps + 1, dtype=torch.int64, device=f0.device)
        return Found(
            accepted,
            torch.where(found, new_value.reshape(()), f0),
            tree.where(found, new_grad, grad),
            found,
            count,
            torch.ones_like(count),
        )

    def update(updates: PyTree, state: LineSearchState, params: PyTree = None, **extra: Any):
        require_extras("armijo_sync_free", extra, "value", "grad", "value_fn")
        if params is None:
            raise TypeError("armijo_sync_free needs params in update(updates, state, params, ...)")
        check_extras("armijo_sync_free", updates, state, extra)
        value_fn, grad = extra["value_fn"], extra["grad"]
        f0 = extra["value"].detach().reshape(())
        flat = extra.get("flat_step")
        if not (isinstance(flat, tree.FlatStep) and flat.describes(params, grad, updates)):
            flat = None  # none published, or not of these trees: the search ravels its own
        slope = (tree.vdot(grad, updates) if flat is None else flat.g @ flat.d).to(f0.dtype)
        ok_start = torch.isfinite(f0) & torch.isfinite(slope) & (slope < 0)
        alpha = _initial_step_tensor(initial_step, f0, slope, grad, state, extra.get("step_hint"))
        inputs = (value_fn, params, updates, grad, f0, slope, alpha, ok_start)
        if compiles_control_flow():
            result, step = compiled_search(*inputs, options, flat)
        else:
            result = all_trials(*inputs)
            step = tree.where(
                result.found, tree.scale(result.alpha, updates), tree.zeros_like(updates)
            )
        new_state = LineSearchState(
            step_size=result.alpha,
            next_value=result.value,
            next_grad=result.grad,
            search_failed=~result.found,
            num_search_evals=result.num_evals.to(state.num_search_evals),
            num_search_grads=result.num_grads.to(state.num_search_grads),
            num_syncs=state.num_syncs,
            previous_value=f0,
        )
        return step, new_state

    def publish(state: LineSearchState, params: PyTree = None, **extra: Any) -> dict[str, Any]:
        published = publish_search(state, params, **extra)
        if compiles_control_flow():  # update's trials ran in torch.cond, charged nowhere
            counts = [state.num_search_evals, state.num_search_grads]  # int64
            published["uncharged_evals"] = torch.stack(counts)
        return published

    return guarded(
        "armijo_sync_free", Transform(init_search_state, update, publish), LineSearchState
    )
