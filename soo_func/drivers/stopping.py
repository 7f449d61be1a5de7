"""The stopping rules of :func:`~soo_func.drivers.minimize.minimize` and what they read.

After each step the driver reads, in one host synchronisation, the new value, the
gradient's 2- and infinity norms, the step's norms and the optimizer's flags
(:func:`read_step`), then asks :func:`stop_reason`. The rules, in their order:

* ``gtol``: ``||g||_inf <= gtol`` (scipy's BFGS / L-BFGS-B convention), and ``gtol_rel``:
  ``||g||_inf <= gtol_rel * max(||g_0||_inf, tiny)`` (scale-free), both only when the
  optimizer does not publish ``converged_ok=False`` (homotopy before t = 1). A bounded
  method publishes ``projected_grad_inf`` (``||P(x - g) - x||_inf``, the stationarity
  measure on a box, :func:`stationarity`), which then takes the place of ``||g||_inf``.
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
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import publication, tree

PyTree = Any

__all__ = [
    "CONVERGED_RULES",
    "DEVICE_OPS",
    "HOST_OPS",
    "MAX_FAILED_SEARCHES",
    "MAX_STALLED_STEPS",
    "ROUNDING_ULPS",
    "RULES",
    "UNBOUNDED_RATIO",
    "RuleOps",
    "StepNumbers",
    "StopRules",
    "Streaks",
    "changed",
    "check_finite_start",
    "host_norm",
    "no_decrease",
    "read_scalars",
    "read_step",
    "rule_flags",
    "start_rules",
    "stationarity",
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
    """The tolerances of one run, fixed at its start (the two that depend on the start are
    0-d tensors on the sync-free path)."""

    gtol: float
    gtol_rel_bound: Any  # gtol_rel * max(||g_0||_inf, tiny); 0 disables
    ftol: float
    xtol: float
    eps: float  # the machine epsilon of the value's dtype
    value_floor: Any  # -UNBOUNDED_RATIO * max(|f_0|, 1)


class StepNumbers(NamedTuple):
    """What the stopping rules and the history read after a step: floats and bools on the
    host (:func:`read_step`), 0-d tensors on the sync-free path
    (:func:`soo_func.drivers.sync_free.device_step`, where ``has_search`` stays a bool and
    ``grad_norm`` is not read)."""

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


class RuleOps(NamedTuple):
    """The few operations the rules use beyond arithmetic, comparisons, ``abs``, ``&`` and
    ``|``: on host numbers (:data:`HOST_OPS`) or on 0-d tensors (:data:`DEVICE_OPS`), so
    one definition serves the host driver and the sync-free one."""

    maximum: Callable[[Any, Any], Any]
    not_: Callable[[Any], Any]
    select: Callable[[Any, Any, Any], Any]  # (condition, if_true, if_false)


def _device_maximum(a: Any, b: Any) -> Any:
    if isinstance(b, torch.Tensor):
        return torch.maximum(a, b)
    return a.clamp_min(b) if isinstance(a, torch.Tensor) else max(a, b)


def _device_not(a: Any) -> Any:
    return torch.logical_not(a) if isinstance(a, torch.Tensor) else not a


def _device_select(condition: Any, a: Any, b: Any) -> Any:
    if isinstance(condition, bool):  # a static flag (no search, no converged_ok)
        return a if condition else b
    return torch.where(condition, a, b)


HOST_OPS = RuleOps(max, operator.not_, lambda condition, a, b: a if condition else b)
DEVICE_OPS = RuleOps(_device_maximum, _device_not, _device_select)


def start_rules(
    value: Any, grad_inf: Any, tols: tuple[float, float, float, float], eps: float, ops: RuleOps
) -> StopRules:
    """The run's tolerances from the start's value and gradient infinity norm (host floats
    or 0-d tensors, with the matching ``ops``); ``tols`` is ``(gtol, gtol_rel, ftol,
    xtol)``."""
    gtol, gtol_rel, ftol, xtol = tols
    tiny = torch.finfo(torch.float64).tiny
    return StopRules(
        gtol=gtol,
        gtol_rel_bound=gtol_rel * ops.maximum(grad_inf, tiny) if gtol_rel > 0 else 0.0,
        ftol=ftol,
        xtol=xtol,
        eps=eps,
        value_floor=-UNBOUNDED_RATIO * ops.maximum(abs(value), 1.0),
    )


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


def stationarity(grad: PyTree, published: dict[str, Any]) -> torch.Tensor:
    """``||g||_inf``, or the published ``projected_grad_inf`` of a bounded method (a
    minimizer on a bound has a non-zero gradient), as a 0-d tensor."""
    projected = published.get("projected_grad_inf")
    if isinstance(projected, torch.Tensor):
        return projected
    return tree.norm(grad, math.inf)


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
    scalars = [value, tree.norm(grad), stationarity(grad, published), tree.norm(updates)]
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


def no_decrease(numbers: StepNumbers, old_value: Any, eps: float, ops: RuleOps = HOST_OPS) -> Any:
    """Whether the value did not fall beyond its rounding:
    ``f_k - f_{k+1} <= ROUNDING_ULPS eps max(|f_k|, |f_{k+1}|)``."""
    value = numbers.value
    return old_value - value <= ROUNDING_ULPS * eps * ops.maximum(abs(old_value), abs(value))


class Streaks(NamedTuple):
    """Steps in a row without progress, for the rules of the module docstring (ints and a
    float on the host, 0-d tensors on the sync-free path)."""

    failed: Any = 0  # failed searches in a row
    stalled: Any = 0  # non-zero search steps in a row without progress
    grad_ref: Any = math.inf  # ||g||_inf where the stalled streak (re)started

    def after(
        self, numbers: StepNumbers, old_value: Any, eps: float, ops: RuleOps = HOST_OPS
    ) -> Streaks:
        """The streaks after the step read in ``numbers``: a failed search extends the
        failed streak (else it restarts at 0); a non-zero search step that does not lower
        the value beyond rounding extends the stalled streak, which restarts at 1 when it
        was 0 or when ``||g||_inf`` fell below half its value where the streak began; a
        decrease resets it; other steps leave it; a continuation's steps
        (``may_converge`` false) reset it, as they need not lower ``f``."""
        select, n = ops.select, numbers
        failed = select(n.search_failed, self.failed + 1, 0)
        restart = (self.stalled == 0) | (n.grad_inf < 0.5 * self.grad_ref)
        stalled = select(restart, 1, self.stalled + 1)
        grad_ref = select(restart, n.grad_inf, self.grad_ref)
        progress = ops.not_(no_decrease(n, old_value, eps, ops))
        stalled, grad_ref = select(progress, 0, stalled), select(progress, math.inf, grad_ref)
        counted = n.has_search & (n.step_norm > 0.0)
        stalled = select(counted, stalled, self.stalled)
        grad_ref = select(counted, grad_ref, self.grad_ref)
        stalled = select(n.may_converge, stalled, 0)
        grad_ref = select(n.may_converge, grad_ref, math.inf)
        return Streaks(failed, stalled, grad_ref)


RULES = (
    "gtol",
    "gtol_rel",
    "ftol",
    "xtol",
    "unbounded",
    "search_failed",
    "stalled",
    "failed_searches",
    "stalled_steps",
)
"""The stopping rules in their order (the first that holds names the stop)."""

CONVERGED_RULES = frozenset(RULES[:4])
"""The rules that mean convergence."""


def rule_flags(
    numbers: StepNumbers, old_value: Any, rules: StopRules, streaks: Streaks, ops: RuleOps
) -> tuple[Any, ...]:
    """Whether each rule of :data:`RULES` holds after the step read in ``numbers``
    (``streaks`` include this step): bools on the host (``HOST_OPS``), 0-d bool tensors on
    the sync-free path (``DEVICE_OPS``). The one definition of the rules of the module
    docstring."""
    n, may, not_ = numbers, numbers.may_converge, ops.not_
    moved = n.step_norm > 0.0
    scale = ops.maximum(ops.maximum(abs(old_value), abs(n.value)), 1.0)
    ftol = moved & (rules.ftol > 0) & (old_value - n.value <= rules.ftol * scale)
    step_bound = rules.xtol * (n.params_norm + rules.xtol)
    xtol = moved & (rules.xtol > 0) & (n.step_norm <= step_bound)
    no_lower = may & no_decrease(n, old_value, rules.eps, ops)
    return (
        may & (n.grad_inf <= rules.gtol),
        may & (n.grad_inf <= rules.gtol_rel_bound),
        may & ftol,
        may & xtol,
        n.value < rules.value_floor,
        n.search_failed & (not_(n.params_changed) | no_lower),
        moved & not_(n.params_changed),
        streaks.failed >= MAX_FAILED_SEARCHES,
        streaks.stalled >= MAX_STALLED_STEPS,
    )


def _message(rule: str, rules: StopRules, streaks: Streaks) -> str:
    if rule == "unbounded":
        return (
            f"unbounded: the value fell below {rules.value_floor:.3g} "
            f"(-max(|f0|, 1) / eps); the objective looks unbounded below"
        )
    if rule == "failed_searches":
        return f"search_failed: {streaks.failed} searches in a row found no acceptable step"
    if rule == "stalled_steps":
        return (
            f"stalled: {streaks.stalled} steps in a row lowered neither the value beyond "
            "rounding nor the gradient norm by half"
        )
    return {"search_failed": SEARCH_FAILED, "stalled": STALLED}.get(rule, rule)


def stop_reason(
    numbers: StepNumbers, old_value: float, rules: StopRules, streaks: Streaks
) -> tuple[str | None, bool]:
    """``(reason, converged)`` by the rules of the module docstring, in their order;
    ``(None, False)`` to go on. ``streaks`` include this step."""
    flags = rule_flags(numbers, old_value, rules, streaks, HOST_OPS)
    for rule, holds in zip(RULES, flags, strict=True):
        if holds:
            return _message(rule, rules, streaks), rule in CONVERGED_RULES
    return None, False
