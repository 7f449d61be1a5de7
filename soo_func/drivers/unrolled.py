"""Differentiating through the steps: ``minimize(..., args=..., adjoint="unrolled")``.

The run takes the optimizer steps of :func:`~soo_func.drivers.minimize.minimize`, but
with ``args`` not detached and the params keeping their graph: autograd records the whole
trajectory ``x_{k+1} = x_k + s_k(x_k, g_k, state_k)``, and ``result.params`` (and
``result.value``) are differentiable with respect to every tensor of ``args`` that
requires grad, and to the starting params when they require grad. This is reverse-mode
differentiation of the iteration (Griewank & Walther, *Evaluating Derivatives*, 2nd ed.,
2008, ch. 15, on implicit and iterative differentiation; Domke, "Generic methods for
optimization-based modeling", AISTATS 2012), the reference that
:mod:`soo_func.drivers.adjoint`'s implicit adjoint is compared against: its memory grows
with the number of steps (each step's forward and double-backward graphs are kept), and it
also differentiates a run stopped early (a truncated solve) or a nonsmooth one.

What the graph contains and what it does not:

* the gradient at each accepted point is computed with ``create_graph=True``, so the
  directions (L-BFGS's two-loop recursion and its pairs ``s = x_k - x_{k-1}``,
  ``y = g_k - g_{k-1}``; nonlinear CG's ``beta``; a Gauss-Newton or Levenberg-Marquardt
  step built from ``torch.func`` products of a ``residual_fn``) are differentiated;
* the decisions read on the host (a line search's step length ``alpha`` chosen by
  comparisons, a trust region's acceptance and radius) are constants of the graph, as in
  any unrolled differentiation of a piecewise-defined iteration;
* curvature products that the eager oracles compute on detached params (the
  ``"linearize"`` Hessian operator of ``newton_krylov``) carry no graph: the unrolled
  derivative of such a direction misses the Hessian's dependence on ``args``. Use a
  quasi-Newton, nonlinear CG or Gauss-Newton direction with ``"unrolled"``.

The unrolled derivative is the derivative of the iteration, not of the solution: it tends
to ``dx*/dtheta`` only where the iteration's Jacobian recursion contracts (gradient descent
with a fixed step does, Ablin, Peyre & Moreau, ICML 2020). A limited-memory quasi-Newton
recursion differentiated through its pairs ``(s, y)`` need not: on an ill-conditioned
problem its derivative can grow without bound while the iterates converge (the
``implicit`` suite of ``benchmarks/bench_implicit.py`` shows such a case). Prefer
``adjoint="implicit"`` at a converged solution.

The value and gradient a search has already evaluated at the accepted point are detached,
so the driver evaluates that point once more, with the graph: one more value and
gradient per step than :func:`~soo_func.drivers.minimize.minimize` (the counts say so).
The trajectory, the stopping rules (read on detached values) and the reasons are those of
``minimize``; an optimizer's published incumbent is not substituted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import torch

from soo_func import tree
from soo_func.base import Transform, apply_updates, update_and_publish
from soo_func.drivers.adjoint import bind_args
from soo_func.drivers.result import MinimizeResult, attach_partial_result
from soo_func.drivers.stopping import (
    HOST_OPS,
    StepNumbers,
    StopRules,
    Streaks,
    check_finite_start,
    host_norm,
    read_scalars,
    read_step,
    start_rules,
    stop_reason,
)
from soo_func.oracles import CountedObjective, charge, raw_function

PyTree = Any

__all__ = ["graph_value_and_grad", "minimize_unrolled"]


def graph_value_and_grad(objective: Callable[[PyTree], torch.Tensor], params: PyTree):
    """``(value, grad)`` of ``objective`` at ``params``, both keeping the graph to
    ``params``' history and to what ``objective`` closes over (``create_graph=True``), so
    that a later backward differentiates through the gradient. Charged to a
    :class:`~soo_func.oracles.CountedObjective` as one value and one gradient."""
    charge(objective, value=1, grad=1)
    leaves, spec = optree.tree_flatten(params)
    with torch.enable_grad():
        inputs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in leaves]
        value = raw_function(objective)(spec.unflatten(inputs))
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError("value_fn must return a scalar (0-d) loss tensor")
        grads = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    return value, spec.unflatten(grads)


class _Trajectory:
    """The run's last good point (differentiable) and its history rows."""

    def __init__(self, objective: CountedObjective, params, value, grad, state, value_host):
        self.objective, self.params, self.value, self.grad = objective, params, value, grad
        self.state, self.value_host, self.num_steps = state, value_host, 0
        self.history: list[dict[str, Any]] = []
        self.streaks = Streaks()

    def row(self, value: float, grad_norm: float, step_norm: float, diagnostics: dict) -> dict:
        o = self.objective
        row = {
            "step": self.num_steps,
            "value": value,
            "grad_norm": grad_norm,
            "step_norm": step_norm,
            "num_value_evals": o.num_value_evals,
            "num_grad_evals": o.num_grad_evals,
            "num_hvp_evals": o.num_hvp_evals,
            **diagnostics,
        }
        self.history.append(row)
        return row

    def commit(self, params, value, grad, state, numbers: StepNumbers) -> dict:
        self.params, self.value, self.grad, self.state = params, value, grad, state
        self.value_host, self.num_steps = numbers.value, self.num_steps + 1
        return self.row(numbers.value, numbers.grad_norm, numbers.step_norm, numbers.diagnostics)

    def result(self, reason: str, converged: bool) -> MinimizeResult:
        o = self.objective
        return MinimizeResult(
            params=self.params,
            value=self.value,
            grad=self.grad,
            grad_norm=tree.overflow_safe_norm(self.grad),
            num_steps=self.num_steps,
            num_value_evals=o.num_value_evals,
            num_grad_evals=o.num_grad_evals,
            num_hvp_evals=o.num_hvp_evals,
            converged=converged,
            reason=reason,
            state=self.state,
            history=self.history,
        )


def _steps(
    run: _Trajectory,
    optimizer: Transform,
    extra: dict[str, Any],
    rules: StopRules,
    max_steps: int,
    callback: Callable | None,
) -> tuple[str, bool]:
    """``minimize``'s loop with every accepted point re-evaluated with its graph."""
    device = tree.leaves(run.params)[0].device
    while run.num_steps < max_steps:
        params, grad = run.params, run.grad
        kwargs = dict(extra, value=run.value, grad=grad, value_fn=run.objective)
        updates, state, published = update_and_publish(optimizer, grad, run.state, params, **kwargs)
        new_params = apply_updates(params, updates)
        new_value, new_grad = graph_value_and_grad(run.objective, new_params)
        numbers = read_step(
            new_value, new_grad, updates, new_params, params, published, rules.xtol > 0, device
        )
        if not math.isfinite(numbers.value):
            run.num_steps += 1
            return "non-finite value: returned the last finite point", False
        old_value = run.value_host
        row = run.commit(new_params, new_value, new_grad, state, numbers)
        run.streaks = run.streaks.after(numbers, old_value, rules.eps)
        reason, converged = stop_reason(numbers, old_value, rules, run.streaks)
        if reason is not None and not converged:
            return reason, False
        if callback is not None and callback(row, run.params):
            return "callback", converged
        if converged:
            return reason, True
    return "max_steps", False


def minimize_unrolled(
    value_fn: Callable[..., torch.Tensor],
    params: PyTree,
    optimizer: Transform,
    args: tuple,
    options: dict[str, Any],
) -> MinimizeResult:
    """:func:`~soo_func.drivers.minimize.minimize` with ``adjoint="unrolled"``: the same
    steps, recorded by autograd (see the module docstring).

    ``options`` are ``minimize``'s keyword arguments ``max_steps``, ``gtol``,
    ``gtol_rel``, ``ftol``, ``xtol``, ``state``, ``callback`` and ``extra``. Params that
    require grad keep their graph (the result is differentiable with respect to them too);
    the caller's tensors are never modified.
    """
    objective = CountedObjective(bind_args(value_fn, args, "unrolled"))
    params = optree.tree_map(  # a leaf of the graph where the caller's start has none
        lambda x: x if x.requires_grad else x.detach().requires_grad_(True), params
    )
    value, grad = graph_value_and_grad(objective, params)
    check_finite_start(value, grad)
    state = optimizer.init(params) if options.get("state") is None else options["state"]
    device = tree.leaves(params)[0].device
    value0, norm0, inf0 = read_scalars([value, tree.norm(grad), tree.norm(grad, math.inf)], device)
    tols = (options["gtol"], options["gtol_rel"], options["ftol"], options["xtol"])
    rules = start_rules(value0, inf0, tols, torch.finfo(value.dtype).eps, HOST_OPS)
    run = _Trajectory(objective, params, value, grad, state, value0)
    run.row(value0, host_norm(optree.tree_map(torch.detach, grad), norm0), 0.0, {})
    if inf0 <= rules.gtol or inf0 <= rules.gtol_rel_bound:
        return run.result("gtol" if inf0 <= rules.gtol else "gtol_rel", True)
    try:
        reason, converged = _steps(
            run, optimizer, dict(options.get("extra") or {}), rules, options["max_steps"],
            options.get("callback"),
        )  # fmt: skip
    except BaseException as err:
        attach_partial_result(err, run.result(f"interrupted: {type(err).__name__}", False))
        raise
    return run.result(reason, converged)
