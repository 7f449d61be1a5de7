"""The Levenberg-Marquardt damping rules: how ``lam`` starts and how it follows the gain ratio.

All rules are pure tensor functions of 0-d tensors (``torch.where``, no host sync), so
they can be checked number by number on hand-made ratios.

* :func:`start_damping` -- the first ``lam``: a user value, or an estimate of the size of
  the model's curvature (``tau * max_i (J^T J)_ii``, Madsen, Nielsen & Tingleff 2004, eq. (3.14)).
* :func:`nielsen_update` -- Nielsen's rule (H. B. Nielsen, "Damping parameter in
  Marquardt's method", IMM-REP-1999-05; MNT 2004, eq. (3.14) and Algorithm 3.16).
* :func:`multiply_update` -- the classic rule (Marquardt 1963): divide the damping by
  ``decrease_factor`` after an accepted step, multiply it by ``increase_factor`` after a
  rejected one.

Moré's rule, which derives ``lam`` from a trust radius instead, is in
:mod:`soo_func.searches.more_radius`; the gain ratio itself in
:mod:`soo_func.searches.acceptance`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DampingUpdate", "multiply_update", "nielsen_update", "start_damping"]


class DampingUpdate(NamedTuple):
    """The new damping ``lam`` and Nielsen's growth factor ``nu`` (unused by other rules)."""

    damping: torch.Tensor
    nu: torch.Tensor


def start_damping(
    damping: torch.Tensor, estimate: torch.Tensor, initial_damping: float | None
) -> torch.Tensor:
    """``damping`` once it is set (non-negative); before the first update (negative) the
    user's ``initial_damping``, or ``estimate`` when that is ``None``."""
    start = estimate if initial_damping is None else torch.full_like(estimate, initial_damping)
    return torch.where(damping < 0, start, damping)


def nielsen_update(
    damping: torch.Tensor, nu: torch.Tensor, ratio: torch.Tensor, accepted: torch.Tensor
) -> DampingUpdate:
    """Nielsen's rule (MNT 2004, eq. (3.14) and Algorithm 3.16).

    Accepted step: ``lam <- lam * max(1/3, 1 - (2 rho - 1)^3)`` and ``nu <- 2``.
    Rejected step: ``lam <- lam * nu`` and ``nu <- 2 nu`` (the damping grows ever faster
    while steps keep failing).
    """
    finite_ratio = torch.where(accepted, ratio, torch.zeros_like(ratio))
    shrink = torch.clamp(1 - (2 * finite_ratio - 1) ** 3, min=1.0 / 3.0)
    new_damping = torch.where(accepted, damping * shrink, damping * nu)
    new_nu = torch.where(accepted, torch.full_like(nu, 2.0), 2 * nu)
    return DampingUpdate(new_damping, new_nu)


def multiply_update(
    damping: torch.Tensor,
    nu: torch.Tensor,
    accepted: torch.Tensor,
    *,
    increase_factor: float,
    decrease_factor: float,
) -> DampingUpdate:
    """The classic rule (Marquardt 1963): ``lam / decrease_factor`` if accepted, else
    ``lam * increase_factor``. ``nu`` is passed through unchanged."""
    new_damping = torch.where(accepted, damping / decrease_factor, damping * increase_factor)
    return DampingUpdate(new_damping, nu)
