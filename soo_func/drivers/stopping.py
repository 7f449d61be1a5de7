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
* ``search_failed``: the search published a failure and its step made no progress beyond
  rounding: a zero step, a step with ``||s||_inf <= eps ||x||_inf`` (the params did not
  change at working precision, ``eps`` of the params' coarsest dtype), or a decrease
  ``f_k - f_{k+1} <= 16 eps max(|f_k|, |f_{k+1}|)`` (the value did not change beyond its
  rounding, the tie rule of :func:`~soo_func.searches.wolfe`); or ``MAX_FAILED_SEARCHES``
  searches in a row failed. A failed search that still lowers the value beyond rounding
  lets the run go on.

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
    "ROUNDING_ULPS",
    "UNBOUNDED_RATIO",
    "StepNumbers",
    "StopRules",
    "check_finite_start",
    "coarsest_eps",
    "host_norm",
    "read_scalars",
    "read_step",
    "stop_reason",
]

MAX_FAILED_SEARCHES = 10
"""Searches failing this many steps in a row stop the run (each may cost tens of evaluations)."""

ROUNDING_ULPS = 16
"""A decrease within this many units of rounding of the value is no decrease."""

UNBOUNDED_RATIO = 1.0 / torch.finfo(torch.float64).eps
"""A value below ``-UNBOUNDED_RATIO * max(|f_0|, 1)`` stops the run as unbounded below."""

SEARCH_FAILED = (
    "search_failed: no acceptable step (the point cannot be improved at this precision or "
    "along this direction)"
)


class StopRules(NamedTuple):
    """The tolerances of one run, fixed at its start."""

    gtol: float
    gtol_rel_bound: float  # gtol_rel * max(||g_0||_inf, tiny); 0 disables
    ftol: float
    xtol: float
    eps: float  # the machine epsilon of the params' coarsest dtype
    value_floor: float  # -UNBOUNDED_RATIO * max(|f_0|, 1)


class StepNumbers(NamedTuple):
    """What the stopping rules and the history read after a step, on the host."""

    value: float
    grad_norm: float
    grad_inf: float
    step_norm: float
    params_norm: float  # NaN unless xtol > 0
    step_inf: float  # NaN unless the optimizer publishes search_failed
    params_inf: float  # likewise
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


def coarsest_eps(params: PyTree) -> float:
    """The largest machine epsilon among the floating leaves of ``params``."""
    return max(torch.finfo(leaf.dtype).eps for leaf in tree.leaves(params))


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
    published: dict[str, Any],
    with_params_norm: bool,
    device: torch.device,
) -> StepNumbers:
    """Everything the stopping rules and the history read, in one host sync (a second
    one only when a 2-norm overflowed, see :func:`host_norm`)."""
    diagnostics = publication.recorded(published)
    flags = [published.get(k) for k in ("converged_ok", "search_failed")]
    flags = [f if isinstance(f, torch.Tensor) else None for f in flags]
    with_inf = flags[1] is not None
    scalars = [value, tree.norm(grad), tree.norm(grad, math.inf), tree.norm(updates)]
    scalars += [tree.norm(params)] if with_params_norm else []
    scalars += [tree.norm(updates, math.inf), tree.norm(params, math.inf)] if with_inf else []
    scalars += [f for f in flags if f is not None] + list(diagnostics.values())
    numbers = read_scalars(scalars, device)
    value_host, grad_norm, grad_inf, step_norm = numbers[:4]
    rest = numbers[4:]
    params_norm = host_norm(params, rest.pop(0)) if with_params_norm else math.nan
    step_inf, params_inf = (rest.pop(0), rest.pop(0)) if with_inf else (math.nan, math.nan)
    may_converge = bool(rest.pop(0)) if flags[0] is not None else True
    failed = bool(rest.pop(0)) if flags[1] is not None else False
    return StepNumbers(
        value_host,
        host_norm(grad, grad_norm),
        grad_inf,
        host_norm(updates, step_norm),
        params_norm,
        step_inf,
        params_inf,
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


def no_progress(numbers: StepNumbers, old_value: float, eps: float) -> bool:
    """Whether a step changed neither the params nor the value beyond rounding."""
    if not numbers.step_norm > 0.0 or numbers.step_inf <= eps * numbers.params_inf:
        return True
    value = numbers.value
    return old_value - value <= ROUNDING_ULPS * eps * max(abs(old_value), abs(value))


def stop_reason(
    numbers: StepNumbers, old_value: float, rules: StopRules, failed_in_a_row: int
) -> tuple[str | None, bool]:
    """``(reason, converged)`` by the rules of the module docstring, in their order;
    ``(None, False)`` to go on. ``failed_in_a_row`` counts this step's failure."""
    if numbers.may_converge:
        reason = _converged(numbers, old_value, rules)
        if reason is not None:
            return reason, True
    if numbers.value < rules.value_floor:
        return (
            f"unbounded: the value fell below {rules.value_floor:.3g} "
            f"(-max(|f0|, 1) / eps); the objective looks unbounded below"
        ), False
    if numbers.search_failed and no_progress(numbers, old_value, rules.eps):
        return SEARCH_FAILED, False
    if failed_in_a_row >= MAX_FAILED_SEARCHES:
        return (
            f"search_failed: {failed_in_a_row} searches in a row found no acceptable step"
        ), False
    return None, False
