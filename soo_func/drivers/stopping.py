"""The stopping rules of :func:`~soo_func.drivers.minimize.minimize` and what they read.

After each step the driver reads, in one host synchronisation, the new value, the
gradient's 2- and infinity norms, the step's norms and the optimizer's flags
(:func:`read_step`), then asks :func:`stop_reason`. The rules, in their order:

* ``gtol``: ``||g||_inf <= gtol`` (scipy's BFGS / L-BFGS-B convention), and ``gtol_rel``:
  ``||g||_inf <= gtol_rel * max(||g_0||_inf, tiny)`` (scale-free), both only when the
  optimizer does not publish ``converged_ok=False`` (homotopy before t = 1).
* ``ftol``: ``f_k - f_{k+1} <= ftol * max(|f_k|, |f_{k+1}|, 1)`` (L-BFGS-B's ``factr``),
  tested on non-zero steps only (a rejected trust-region step is not a stall).
* ``xtol``: a non-zero step with ``||s|| <= xtol * (||x|| + xtol)`` (scipy's least_squares).
* ``unbounded``: ``f_{k+1} < -max(|f_0|, 1) / eps_64`` (``eps_64`` the float64 machine
  epsilon, a floor of about ``-4.5e15 max(|f_0|, 1)``): a decrease of sixteen orders of
  magnitude beyond the start's scale is taken as an objective unbounded below.
* ``search_failed`` / ``stalled``, one rule for steps below rounding, for optimizers with a
  search (those that publish ``search_failed``): a step that leaves the params unchanged
  at working precision (``x + s == x`` in every entry), or a failed search whose step did
  not lower the value beyond its rounding, ``f_k - f_{k+1} <= 16 eps max(|f_k|, |f_{k+1}|)``
  (``eps`` of the value's dtype; the tie rule of :func:`~soo_func.searches.wolfe`), stops:
  "search_failed" when the search failed, "stalled" when it accepted a step that does not
  change the params. Also ``MAX_FAILED_SEARCHES`` failed searches in a row stop, and so do
  ``MAX_STALLED_STEPS`` non-zero steps in a row that neither lower the value beyond its
  rounding nor halve the gradient's infinity norm (a search accepting ties while its
  direction points into a wall of NaN, say; under Hager & Zhang's approximate Wolfe
  conditions the ties go on while the gradient keeps shrinking, which is progress). A failed
  search that still lowers the value beyond rounding lets the run go on; a zero step that
  did not fail (a rejected trust-region step) is not a stall. The value rules are not
  applied while the optimizer publishes ``converged_ok=False`` (a homotopy's steps lower
  its deformed objective, not ``f``).

The driver itself stops on a non-finite value (``-inf`` reads as unbounded), on
``max_steps`` and on a ``callback`` returning ``True``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import publication, tree

PyTree = Any

__all__ = [
    "MAX_FAILED_SEARCHES",
    "MAX_STALLED_STEPS",
    "ROUNDING_ULPS",
    "UNBOUNDED_RATIO",
    "StepNumbers",
    "StopRules",
    "Streaks",
    "check_finite_start",
    "host_norm",
    "read_scalars",
    "read_step",
    "stop_reason",
]

MAX_FAILED_SEARCHES = 10
"""Searches failing this many steps in a row stop the run (each may cost tens of evaluations)."""

MAX_STALLED_STEPS = 10
"""Non-zero steps in a row without progress (see the module docstring) that stop the run."""

ROUNDING_ULPS = 16
"""A decrease within this many units of rounding of the value is no decrease."""

UNBOUNDED_RATIO = 1.0 / torch.finfo(torch.float64).eps
"""A value below ``-UNBOUNDED_RATIO * max(|f_0|, 1)`` stops the run as unbounded below."""

SEARCH_FAILED = (
    "search_failed: no acceptable step (the point cannot be improved at this precision or "
    "along this direction)"
)


STALLED = "stalled: the accepted step does not change the params at working precision (x + s == x)"


class StopRules(NamedTuple):
    """The tolerances of one run, fixed at its start."""

    gtol: float
    gtol_rel_bound: float  # gtol_rel * max(||g_0||_inf, tiny); 0 disables
    ftol: float
    xtol: float
    eps: float  # the machine epsilon of the value's dtype
    value_floor: float  # -UNBOUNDED_RATIO * max(|f_0|, 1)


class StepNumbers(NamedTuple):
    """What the stopping rules and the history read after a step, on the host."""

    value: float
    grad_norm: float
    grad_inf: float
    step_norm: float
    params_norm: float  # NaN unless xtol > 0
    has_search: bool  # the optimizer publishes search_failed
    params_changed: bool  # x + s != x somewhere (True unless the optimizer has a search)
    may_converge: bool  # False while the optimizer publishes converged_ok=False
    search_failed: bool
    diagnostics: dict[str, float]


def read_scalars(scalars: list[torch.Tensor], device: torch.device) -> list[float]:
    """Read many 0-d tensors on the host in one synchronisation (as float64)."""
    if not scalars:
        return []
    return torch.stack(
        [t.detach().to(device=device, dtype=torch.float64) for t in scalars]
    ).tolist()


def host_norm(x: PyTree, read: float) -> float:
    """``read`` (a 2-norm read on the host), or, when it overflowed on finite leaves, the
    overflow-free :func:`~soo_func.tree.scaled_norm` (one more sync, only then)."""
    if math.isinf(read) and bool(tree.all_finite(x)):
        return float(tree.scaled_norm(x).double())
    return read


def changed(new: PyTree, old: PyTree) -> torch.Tensor:
    """0-d bool: some entry of ``new`` differs from ``old`` (no host sync)."""
    flags = [(a != b).any() for a, b in zip(tree.leaves(new), tree.leaves(old), strict=True)]
    return torch.stack(flags).any() if len(flags) > 1 else flags[0]


def check_finite_start(value: torch.Tensor, grad: PyTree) -> None:
    """Raise when the value or a gradient entry is NaN/inf at the start (leafwise
    ``isfinite``, no squares that could overflow)."""
    if not bool(torch.isfinite(value)):
        raise ValueError(
            f"the objective is {float(value)} at the starting params: start from a point where "
            "value_fn is finite"
        )
    if not bool(tree.all_finite(grad)):
        raise ValueError(
            "the gradient has NaN/inf entries at the starting params: check value_fn for "
            "log(0), division by zero or overflow there"
        )


def read_step(
    value: torch.Tensor,
    grad: PyTree,
    updates: PyTree,
    params: PyTree,
    old_params: PyTree,
    published: dict[str, Any],
    with_params_norm: bool,
    device: torch.device,
) -> StepNumbers:
    """Everything the stopping rules and the history read, in one host sync (a second
    one only when a 2-norm overflowed, see :func:`host_norm`)."""
    diagnostics = publication.recorded(published)
    flags = [published.get(k) for k in ("converged_ok", "search_failed")]
    flags = [f if isinstance(f, torch.Tensor) else None for f in flags]
    with_search = flags[1] is not None
    scalars = [value, tree.norm(grad), tree.norm(grad, math.inf), tree.norm(updates)]
    scalars += [tree.norm(params)] if with_params_norm else []
    scalars += [changed(params, old_params)] if with_search else []
    scalars += [f for f in flags if f is not None] + list(diagnostics.values())
    numbers = read_scalars(scalars, device)
    value_host, grad_norm, grad_inf, step_norm = numbers[:4]
    rest = numbers[4:]
    params_norm = host_norm(params, rest.pop(0)) if with_params_norm else math.nan
    params_changed = bool(rest.pop(0)) if with_search else True
    may_converge = bool(rest.pop(0)) if flags[0] is not None else True
    failed = bool(rest.pop(0)) if flags[1] is not None else False
    return StepNumbers(
        value_host,
        host_norm(grad, grad_norm),
        grad_inf,
        host_norm(updates, step_norm),
        params_norm,
        with_search,
        params_changed,
        may_converge,
        failed,
        dict(zip(diagnostics, rest, strict=True)),
    )


def _converged(numbers: StepNumbers, old_value: float, rules: StopRules) -> str | None:
    moved, value = numbers.step_norm > 0.0, numbers.value
    if numbers.grad_inf <= rules.gtol:
        return "gtol"
    if numbers.grad_inf <= rules.gtol_rel_bound:
        return "gtol_rel"
    decrease_bound = rules.ftol * max(abs(old_value), abs(value), 1)
    if moved and rules.ftol > 0 and old_value - value <= decrease_bound:
        return "ftol"
    step_bound = rules.xtol * (numbers.params_norm + rules.xtol)
    if moved and rules.xtol > 0 and numbers.step_norm <= step_bound:
        return "xtol"
    return None


def no_decrease(numbers: StepNumbers, old_value: float, eps: float) -> bool:
    """Whether the value did not fall beyond its rounding."""
    value = numbers.value
    return old_value - value <= ROUNDING_ULPS * eps * max(abs(old_value), abs(value))


class Streaks(NamedTuple):
    """Steps in a row without progress, for the rules of the module docstring."""

    failed: int = 0  # failed searches in a row
    stalled: int = 0  # non-zero search steps in a row without progress
    grad_ref: float = math.inf  # ||g||_inf where the stalled streak (re)started

    def after(self, numbers: StepNumbers, old_value: float, eps: float) -> Streaks:
        """The streaks after the step read in ``numbers``."""
        failed = self.failed + 1 if numbers.search_failed else 0
        if not numbers.may_converge:  # a continuation's steps need not lower f itself
            return Streaks(failed)
        if not numbers.has_search or not numbers.step_norm > 0.0:
            return self._replace(failed=failed)
        if not no_decrease(numbers, old_value, eps):
            return Streaks(failed)
        if self.stalled == 0 or numbers.grad_inf < 0.5 * self.grad_ref:
            return Streaks(failed, 1, numbers.grad_inf)
        return Streaks(failed, self.stalled + 1, self.grad_ref)


def stop_reason(
    numbers: StepNumbers, old_value: float, rules: StopRules, streaks: Streaks
) -> tuple[str | None, bool]:
    """``(reason, converged)`` by the rules of the module docstring, in their order;
    ``(None, False)`` to go on. ``streaks`` include this step."""
    if numbers.may_converge:
        reason = _converged(numbers, old_value, rules)
        if reason is not None:
            return reason, True
    if numbers.value < rules.value_floor:
        return (
            f"unbounded: the value fell below {rules.value_floor:.3g} "
            f"(-max(|f0|, 1) / eps); the objective looks unbounded below"
        ), False
    no_lower = numbers.may_converge and no_decrease(numbers, old_value, rules.eps)
    if numbers.search_failed and (not numbers.params_changed or no_lower):
        return SEARCH_FAILED, False
    if numbers.step_norm > 0.0 and not numbers.params_changed:
        return STALLED, False
    if streaks.failed >= MAX_FAILED_SEARCHES:
        return (
            f"search_failed: {streaks.failed} searches in a row found no acceptable step"
        ), False
    if streaks.stalled >= MAX_STALLED_STEPS:
        return (
            f"stalled: {streaks.stalled} steps in a row lowered neither the value beyond "
            "rounding nor the gradient norm by half"
        ), False
    return None, False
