"""The line search of :func:`~soo_func.bounds.lbfgs_b`: strong Wolfe on a segment of the box.

``phi(alpha) = f(x + alpha d)`` for ``alpha in (0, alpha_max]``, where every point is
feasible (``alpha_max`` is the largest step that keeps ``x + alpha d`` in the box). The
search brackets and zooms as N&W Algorithms 3.5 and 3.6 with the cubic interpolation of
eq. (3.59) (:func:`~soo_func.searches.line.cubic_minimizer`), clamped to the middle
98% of the bracket (bisection where the cubic has no minimizer), and accepts a trial that meets ``phi(alpha) <= phi(0) + c1 alpha
phi'(0)`` and ``|phi'(alpha)| <= c2 |phi'(0)|`` (L-BFGS-B's ``dcsrch`` conditions, with
its ``c1 = 1e-3``, ``c2 = 0.9``). It extrapolates by 4x up to ``alpha_max`` while the slope
stays steep, and when the evaluations run out returns the lowest trial with sufficient
decrease, if any. It decides on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.bounds.box import Box
from soo_func.oracles import value_and_grad
from soo_func.searches.line import cubic_minimizer

PyTree = Any

__all__ = ["Accepted", "box_wolfe_search", "feasible_step", "max_feasible_step"]


class Accepted(NamedTuple):
    """The accepted trial: the flat step, the value and gradient there."""

    delta: torch.Tensor
    value: torch.Tensor
    grad: PyTree


def feasible_step(x: torch.Tensor, target: torch.Tensor, box: Box) -> torch.Tensor:
    """``delta ~= target - x`` with ``x + delta`` inside the box in floating point (the
    driver applies ``x + delta``; the rounding of ``target - x`` may push it one unit out)."""
    delta = target - x
    for _ in range(4):
        delta = delta - (x + delta - box.project(x + delta))
    return torch.where(box.project(x + delta) == x + delta, delta, torch.zeros_like(delta))


def max_feasible_step(x: torch.Tensor, d: torch.Tensor, box: Box) -> float:
    """The largest ``alpha`` with ``x + alpha d`` in the box (``inf`` when unbounded)."""
    up = torch.where(d > 0, (box.upper - x) / torch.where(d > 0, d, 1.0), torch.inf)
    down = torch.where(d < 0, (box.lower - x) / torch.where(d < 0, d, -1.0), torch.inf)
    return float(torch.minimum(up, down).amin()) if d.numel() else math.inf


def box_wolfe_search(
    value_fn: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    d: torch.Tensor,
    box: Box,
    start: tuple[float, float, float, float],
    constants: tuple[float, float, int],
) -> Accepted | None:
    """The accepted trial along ``d`` from ``params`` (see the module docstring), or
    ``None`` when no trial lowered the value. ``start = (phi(0), phi'(0), alpha_0,
    alpha_max)``; ``constants = (c1, c2, max_evals)``."""
    f0, slope0, alpha, alpha_max = start
    c1, c2, max_evals = constants
    x = tree.ravel(params).flat
    lo, f_lo, slope_lo = 0.0, f0, slope0
    hi = f_hi = slope_hi = math.nan
    best: Accepted | None = None
    best_value = f0
    for _ in range(max_evals):
        delta = feasible_step(x, x + alpha * d, box)
        trial_value, trial_grad = value_and_grad(value_fn)(
            tree.add(params, tree.unravel(delta, params))
        )
        ft = float(trial_value)
        slope = float(torch.dot(tree.ravel(trial_grad).flat, d)) if math.isfinite(ft) else math.nan
        decrease = math.isfinite(ft) and ft <= f0 + c1 * alpha * slope0
        if decrease and ft < best_value:
            best, best_value = Accepted(delta, trial_value, trial_grad), ft
        if decrease and abs(slope) <= c2 * abs(slope0):
            return Accepted(delta, trial_value, trial_grad)
        if not decrease or ft >= f_lo:
            hi, f_hi, slope_hi = alpha, ft, slope
        else:  # N&W Alg. 3.6: alpha becomes lo; the old lo bounds when the slope turned
            beyond = math.inf if math.isnan(hi) else hi - lo
            if slope * beyond >= 0:
                hi, f_hi, slope_hi = lo, f_lo, slope_lo
            lo, f_lo, slope_lo = alpha, ft, slope
        if math.isnan(hi):
            if alpha >= alpha_max:
                return best
            alpha = min(4.0 * alpha, alpha_max)
            continue
        guess = (
            cubic_minimizer(lo, f_lo, slope_lo, hi, f_hi, slope_hi)
            if math.isfinite(f_hi)
            else math.nan
        )
        low, high = min(lo, hi), max(lo, hi)
        margin = 0.01 * (high - low)
        alpha = (
            min(max(guess, low + margin), high - margin)
            if math.isfinite(guess)
            else 0.5 * (lo + hi)
        )
        if high - low <= 1e-12 * high:
            return best
    return best
