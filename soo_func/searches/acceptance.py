"""Acceptance rules shared by :func:`~soo_func.searches.trust_region` and Levenberg(-Marquardt).

Both searches evaluate one trial point ``x + p`` per update and judge it by the gain ratio

    rho = (f(x) - f(x + p)) / (m(0) - m(p))

(Nocedal & Wright, *Numerical Optimization*, 2nd ed., eq. (4.4); Madsen, Nielsen &
Tingleff 2004, eq. (2.18)): the step is accepted when ``rho`` exceeds a threshold, and a
rejected step leaves the point, the value and the gradient as they were.

* :func:`gain_ratio` -- ``rho``, with the non-finite and non-positive-prediction cases
  mapped to ``-inf`` (a rejected step).
* :func:`rounding_safe_ratio` -- ``rho``, taken as 1 when the predicted decrease is below
  the rounding of ``f`` (so the radius does not collapse on noise near a minimizer).
* :func:`radius_update` -- the trust-region radius rule of N&W Algorithm 4.1.
* :func:`accept_or_stay` -- the value, gradient and step after the decision.

All are pure tensor functions of 0-d tensors (``torch.where``, no host sync), so they can
be checked number by number on hand-made ratios.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from soo_func import tree

PyTree = Any

__all__ = [
    "Decision",
    "accept_or_stay",
    "gain_ratio",
    "radius_update",
    "rounding_safe_ratio",
]


def gain_ratio(actual: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """``rho = actual / predicted`` reduction (N&W eq. (4.4); MNT eq. (2.18)).

    ``-inf`` when the prediction is not positive or either reduction is not finite, so
    that every acceptance test rejects the step.
    """
    ok = (predicted > 0) & torch.isfinite(actual) & torch.isfinite(predicted)
    safe = torch.where(ok, predicted, torch.ones_like(predicted))
    return torch.where(ok, actual / safe, torch.full_like(actual, -torch.inf))


def rounding_safe_ratio(
    value: torch.Tensor, trial_value: torch.Tensor, predicted: torch.Tensor
) -> torch.Tensor:
    """``rho`` of :func:`gain_ratio`, taken as 1 when the predicted decrease is below the
    rounding of ``f``.

    Near a minimizer ``m(0) - m(p)`` can fall under ``10 eps |f|``; ``rho`` is then
    rounding noise and would shrink the radius to nothing. A trial that does not raise
    ``f`` is accepted as an exact model (``rho = 1``) instead.
    """
    eps = torch.finfo(value.dtype).eps
    at_rounding = predicted.abs() <= 10 * eps * value.abs().clamp(min=torch.finfo(value.dtype).tiny)
    ratio = gain_ratio(value - trial_value, predicted)
    return torch.where(at_rounding & (trial_value <= value), torch.ones_like(ratio), ratio)


def radius_update(
    radius: torch.Tensor,
    ratio: torch.Tensor,
    step_norm: torch.Tensor,
    *,
    shrink_below: float,
    grow_above: float,
    shrink_factor: float,
    grow_factor: float,
    max_radius: float,
    boundary_rtol: float = 1e-6,
) -> torch.Tensor:
    """The radius rule of Nocedal & Wright, Algorithm 4.1.

    ``rho < shrink_below`` (1/4): ``radius <- shrink_factor * ||p||`` (N&W use 1/4 of the
    radius; shrinking from the step's length, as in Moré's MINPACK, never leaves the
    new radius above a short interior step that failed). ``rho > grow_above`` (3/4) and
    the step on the boundary (``||p|| >= (1 - boundary_rtol) radius``):
    ``radius <- min(grow_factor * radius, max_radius)``. Otherwise unchanged.

    Safeguards (the radius stays finite and positive for a finite positive ``radius``):
    a step whose norm is not finite (a NaN or overflowing model) shrinks the radius
    itself, ``shrink_factor * radius``; a zero step (nothing left to try: the subproblem
    returned ``p = 0``) does too, so that a ``min_radius`` test stops a run that cannot
    move instead of reading a radius of 0. A NaN ``ratio`` counts as a rejection.
    """
    usable = torch.isfinite(step_norm) & (step_norm > 0)
    step_norm = torch.where(usable, step_norm, radius)
    on_boundary = step_norm >= (1 - boundary_rtol) * radius
    shrunk = shrink_factor * torch.minimum(step_norm, radius)
    grown = torch.clamp(grow_factor * radius, max=max_radius)
    new = torch.where(ratio > grow_above, torch.where(on_boundary, grown, radius), radius)
    return torch.where((ratio < shrink_below) | torch.isnan(ratio), shrunk, new)


class Decision(NamedTuple):
    """What an accept/reject decision hands on: the step taken (zero when rejected) and
    the value and gradient at the resulting point."""

    step: PyTree
    next_value: torch.Tensor
    next_grad: PyTree


def accept_or_stay(
    accepted: torch.Tensor,
    step: PyTree,
    trial_value: torch.Tensor,
    trial_grad: PyTree,
    value: torch.Tensor,
    grad: PyTree,
) -> Decision:
    """The trial's step, value and gradient when ``accepted``; else a zero step and the
    current value and gradient (N&W Algorithm 4.1: ``x_{k+1} = x_k`` on rejection)."""
    return Decision(
        step=tree.where(accepted, step, tree.zeros_like(step)),
        next_value=torch.where(accepted, trial_value, value),
        next_grad=tree.where(accepted, trial_grad, grad),
    )
