"""The driver :func:`minimize`, its result and stopping rules.

The drivers own the host-side loop: they evaluate the objective, call the
optimizer's ``update``, apply the updates and decide when to stop. They never
evaluate a point twice: when the optimizer publishes ``next_value`` and
``next_grad`` for its own objective (a line search that has already evaluated the
accepted point), those are reused; when they belong to a rewritten objective (the
published ``value_fn``) that also publishes ``recover_objective``, the driver's value
and gradient are recovered from them. See ``docs/design.md``.

Stopping rules (checked in this order after each step):

* ``gtol``: ``||grad||_inf <= gtol`` (scipy's BFGS / L-BFGS-B convention), only when
  the optimizer does not publish ``converged_ok=False`` (homotopy before t = 1).
* ``ftol``: ``f_k - f_{k+1} <= ftol * max(|f_k|, |f_{k+1}|, 1)`` (L-BFGS-B's ``factr`` rule),
  tested on non-zero steps only (a rejected trust-region step is not a stall).
* ``xtol``: a non-zero step with ``||s|| <= xtol * (||x|| + xtol)`` (scipy's least_squares rule).
* ``search_failed``: the search published a failure and returned a zero step.
* ``non-finite``: the objective became NaN/inf; the last finite point is returned.
* ``max_steps``; ``callback`` returning ``True``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from soo_func import publication, tree
from soo_func.base import Transform, apply_updates, check_params, update_and_publish
from soo_func.oracles import CountedObjective, value_and_grad

PyTree = Any

__all__ = ["MinimizeResult", "minimize"]


@dataclass
class MinimizeResult:
    """What :func:`minimize` returns.

    ``history`` holds one dict per step (``step``, ``value``, ``grad_norm``,
    ``step_norm``, evaluation counts, and any 0-d diagnostics the optimizer
    published, e.g. ``continuation_t``); entry 0 is the starting point.
    """

    params: PyTree
    value: torch.Tensor
    grad: PyTree
    grad_norm: torch.Tensor
    num_steps: int
    num_value_evals: int
    num_grad_evals: int
    num_hvp_evals: int
    converged: bool
    reason: str
    state: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    num_residual_evals: int = 0  # least_squares: residual_fn evaluations by the optimizer


def _read_scalars(scalars: list[torch.Tensor], device: torch.device) -> list[float]:
    """Read many 0-d tensors on the host in one synchronisation (as float64)."""
    if not scalars:
        return []
    return torch.stack(
        [t.detach().to(device=device, dtype=torch.float64) for t in scalars]
    ).tolist()


def _reusable(published: dict[str, Any], objective: CountedObjective, new_params: PyTree):
    """``(value, grad)`` of ``objective`` at ``new_params`` from what a search published.

    Either the search evaluated the driver's own objective there (``next_value_fn is
    objective``), or it evaluated a rewritten objective (``next_value_fn`` is the
    published ``value_fn``) and ``recover_objective(value, grad, params)`` maps its value
    and gradient there to the driver's (a homotopy's ``f = f_t + (1 - t) <g0, x>``).
    ``None`` when the driver must evaluate the point itself.
    """
    next_fn, next_grad = published.get("next_value_fn"), published.get("next_grad")
    if next_fn is None or next_grad is None:
        return None
    if next_fn is objective:
        return published["next_value"], next_grad
    recover = published.get("recover_objective")
    if recover is not None and next_fn is published.get("value_fn"):
        return recover(published["next_value"], next_grad, new_params)
    return None


def _incumbent_if_better(incumbent, value_host: float, objective: CountedObjective):
    """``(params, value, grad)`` of the published incumbent when its value is below
    ``value_host`` (one host read, one counted evaluation), else ``None``.

    An optimizer that explores away from its best point (a homotopy following a curve
    through several minimizers) publishes ``incumbent_params`` / ``incumbent_value``; a
    run stopped before convergence then returns the incumbent, not the exploring point.
    """
    if incumbent is None:
        return None
    params, value = incumbent
    if not isinstance(value, torch.Tensor) or not float(value) < value_host:
        return None
    value, grad = value_and_grad(objective)(params)
    return params, value, grad


def _check_finite_start(value: torch.Tensor, grad: PyTree) -> None:
    if not bool(torch.isfinite(value)):
        raise ValueError(
            f"the objective is {float(value)} at the starting params: start from a point where "
            "value_fn is finite"
        )
    if not bool(torch.isfinite(tree.norm(grad))):
        raise ValueError(
            "the gradient has NaN/inf entries at the starting params: check value_fn for "
            "log(0), division by zero or overflow there"
        )


def _progress_printer(enabled: bool) -> Callable[[dict[str, float]], None]:
    if not enabled:
        return lambda row: None
    try:
        from tqdm.auto import tqdm  # optional dependency (the bench extra), only on request
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        tqdm = None
    if tqdm is not None:
        bar = tqdm(desc="minimize", unit="step", leave=False)

        def show(row):
            bar.update(1)
            bar.set_postfix(value=f"{row['value']:.6g}", grad_norm=f"{row['grad_norm']:.3g}")

        return show

    def show(row):  # pragma: no cover
        print(
            f"step {row['step']:5d}  value {row['value']:.8g}  |g| {row['grad_norm']:.3g}",
            file=sys.stderr,
        )

    return show


class _StepNumbers(NamedTuple):
    """What the stopping rules and the history read after a step, on the host."""

    value: float
    grad_norm: float
    grad_inf: float
    step_norm: float
    params_norm: float  # NaN unless xtol > 0
    may_converge: bool  # False while the optimizer publishes converged_ok=False
    search_failed: bool
    diagnostics: dict[str, float]


def _read_step(
    value: torch.Tensor,
    grad: PyTree,
    updates: PyTree,
    params: PyTree,
    published: dict[str, Any],
    with_params_norm: bool,
    device: torch.device,
) -> _StepNumbers:
    """Everything the stopping rules and the history read, in one host sync."""
    diagnostics = publication.recorded(published)
    flags = [published.get(k) for k in ("converged_ok", "search_failed")]
    flags = [f if isinstance(f, torch.Tensor) else None for f in flags]
    scalars = [value, tree.norm(grad), tree.norm(grad, math.inf), tree.norm(updates)]
    scalars += [tree.norm(params)] if with_params_norm else []
    scalars += [f for f in flags if f is not None] + list(diagnostics.values())
    numbers = _read_scalars(scalars, device)
    value_host, grad_norm, grad_inf, step_norm = numbers[:4]
    rest = numbers[4:]
    params_norm = rest.pop(0) if with_params_norm else math.nan
    may_converge, failed = True, False
    if flags[0] is not None:
        may_converge = bool(rest.pop(0))
    if flags[1] is not None:
        failed = bool(rest.pop(0))
    return _StepNumbers(
        value_host,
        grad_norm,
        grad_inf,
        step_norm,
        params_norm,
        may_converge,
        failed,
        dict(zip(diagnostics, rest, strict=True)),
    )


_SEARCH_FAILED = (
    "search_failed: no acceptable step (the point cannot be improved at this precision or "
    "along this direction)"
)


def _stop_reason(
    numbers: _StepNumbers, old_value: float, gtol: float, ftol: float, xtol: float
) -> tuple[str | None, bool]:
    """``(reason, converged)`` by the rules of the module docstring, in their order;
    ``(None, False)`` to go on."""
    moved = numbers.step_norm > 0.0
    value = numbers.value
    if numbers.may_converge:
        if numbers.grad_inf <= gtol:
            return "gtol", True
        if moved and ftol > 0 and old_value - value <= ftol * max(abs(old_value), abs(value), 1):
            return "ftol", True
        if moved and xtol > 0 and numbers.step_norm <= xtol * (numbers.params_norm + xtol):
            return "xtol", True
    if numbers.search_failed and not moved:
        return _SEARCH_FAILED, False
    return None, False


def _history_row(step: int, numbers: tuple, objective: CountedObjective) -> dict[str, Any]:
    value, grad_norm, step_norm, diagnostics = numbers
    return {
        "step": step,
        "value": value,
        "grad_norm": grad_norm,
        "step_norm": step_norm,
        "num_value_evals": objective.num_value_evals,
        "num_grad_evals": objective.num_grad_evals,
        "num_hvp_evals": objective.num_hvp_evals,
        **diagnostics,
    }


def minimize(
    value_fn: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    optimizer: Transform,
    *,
    max_steps: int = 1000,
    gtol: float = 1e-5,
    ftol: float = 0.0,
    xtol: float = 0.0,
    callback: Callable[[dict[str, float], PyTree], bool | None] | None = None,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
) -> MinimizeResult:
    """Minimize the scalar ``value_fn(params)`` with ``optimizer`` from ``params``.

    Args:
      value_fn: params -> 0-d loss tensor (bind data with ``functools.partial``).
      params: the starting pytree of floating tensors (not modified).
      optimizer: a :class:`~soo_func.Transform`, e.g. ``chain(lbfgs(), wolfe())``.
      max_steps: the most optimizer steps.
      gtol: stop when the gradient's infinity norm is at most ``gtol``.
      ftol: stop when the relative decrease of the value is at most ``ftol`` (0 disables).
        Steps that a trust region or Levenberg-Marquardt rejected (zero steps) are not tested.
      xtol: stop when an accepted step is at most ``xtol * (||params|| + xtol)``
        (``scipy.optimize.least_squares``' rule; 0 disables).
      callback: ``callback(row, params)`` after each step; returning ``True`` stops.
      progress: show a progress bar (tqdm) with the value and gradient norm.
      extra: more keyword extras for ``update`` (e.g. ``residual_fn``).
    """
    check_params(params)
    objective = CountedObjective(value_fn)
    extra = dict(extra or {})
    state = optimizer.init(params)
    value, grad = value_and_grad(objective)(params)
    _check_finite_start(value, grad)
    show = _progress_printer(progress)
    device = tree.leaves(params)[0].device
    value_host, grad_norm, grad_inf = _read_scalars(
        [value, tree.norm(grad), tree.norm(grad, math.inf)], device
    )
    history = [_history_row(0, (value_host, grad_norm, 0.0, {}), objective)]
    reason, converged, num_steps = "max_steps", grad_inf <= gtol, 0
    reason = "gtol" if converged else reason
    incumbent = None  # the best point an exploring optimizer published (params, value)
    while not converged and num_steps < max_steps:
        kwargs = dict(extra, value=value, grad=grad, value_fn=objective)
        updates, state, published = update_and_publish(optimizer, grad, state, params, **kwargs)
        if "incumbent_params" in published:
            incumbent = (published["incumbent_params"], published.get("incumbent_value"))
        new_params = apply_updates(params, updates)
        reuse = _reusable(published, objective, new_params)
        new_value, new_grad = reuse if reuse is not None else value_and_grad(objective)(new_params)
        num_steps += 1
        numbers = _read_step(new_value, new_grad, updates, new_params, published, xtol > 0, device)
        if not math.isfinite(numbers.value):
            reason = "non-finite value: returned the last finite point"
            break
        old_value = value_host
        params, value, grad, value_host = new_params, new_value, new_grad, numbers.value
        row_numbers = (numbers.value, numbers.grad_norm, numbers.step_norm, numbers.diagnostics)
        row = _history_row(num_steps, row_numbers, objective)
        history.append(row)
        show(row)
        stop, converged = _stop_reason(numbers, old_value, gtol, ftol, xtol)
        if stop is not None:
            reason = stop
            if not converged:
                break
        if callback is not None and callback(row, params):
            reason = "callback"
            break
    better = None if converged else _incumbent_if_better(incumbent, value_host, objective)
    if better is not None:
        params, value, grad = better
        reason += "; returned the optimizer's incumbent (its best point, lower than the last)"
    return MinimizeResult(
        params=params,
        value=value,
        grad=grad,
        grad_norm=tree.norm(grad),
        num_steps=num_steps,
        num_value_evals=objective.num_value_evals,
        num_grad_evals=objective.num_grad_evals,
        num_hvp_evals=objective.num_hvp_evals,
        converged=converged,
        reason=reason,
        state=state,
        history=history,
    )
