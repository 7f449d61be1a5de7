"""The driver :func:`minimize` and its result.

The drivers own the host-side loop: they evaluate the objective, call the
optimizer's ``update``, apply the updates and decide when to stop. They never
evaluate a point twice: when the optimizer publishes ``next_value`` and
``next_grad`` for its own objective (a line search that has already evaluated the
accepted point), those are reused; when they belong to a rewritten objective (the
published ``value_fn``) that also publishes ``recover_objective``, the driver's value
and gradient are recovered from them. See ``docs/design.md``.

The stopping rules (gtol, gtol_rel, ftol, xtol, unbounded, search_failed) are those of
:mod:`soo_func.drivers.stopping`. The driver also stops on a non-finite value (the last
finite point is returned; ``-inf`` reads as unbounded), on ``max_steps`` and on a
``callback`` returning ``True``. This is the host loop, one host read a step;
``check_every=None`` (or ``k``) and ``compile=True`` run the sync-free loop of
:mod:`soo_func.drivers.sync_free` instead (the same rules, on tensors).

Params are detached first: the result's params are plain tensors without a graph, and the
caller's params are never touched. When ``value_fn`` (or the optimizer) raises, including
``KeyboardInterrupt``, the same exception propagates with the run so far attached as
``err.partial_result`` (a :class:`MinimizeResult` at the last good point, reason
``"interrupted: <ExcType>"``); ``minimize(value_fn, partial.params, optimizer,
state=partial.state)`` resumes it on the same trajectory.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from soo_func import tree
from soo_func.base import (
    Transform,
    apply_updates,
    check_params,
    check_transform,
    update_and_publish,
)
from soo_func.checks import refuse_vmap
from soo_func.drivers.adjoint import bind_args, check_adjoint, with_adjoint
from soo_func.drivers.outcome import reusable
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
from soo_func.drivers.sync_free import minimize_sync_free
from soo_func.drivers.unrolled import minimize_unrolled
from soo_func.oracles import CountedObjective, value_and_grad

PyTree = Any

__all__ = ["MinimizeResult", "attach_partial_result", "minimize"]


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


@dataclass
class _Run:
    """The last good point of a run: what the result, or a partial result attached to an
    exception, returns."""

    objective: CountedObjective
    params: PyTree
    value: torch.Tensor
    grad: PyTree
    value_host: float
    state: Any
    history: list[dict[str, Any]]
    num_steps: int = 0
    streaks: Streaks = field(default_factory=Streaks)

    def commit(self, params, value, grad, state, numbers: StepNumbers) -> dict[str, Any]:
        """Move to the step's new point; return its history row."""
        self.params, self.value, self.grad, self.state = params, value, grad, state
        self.value_host, self.num_steps = numbers.value, self.num_steps + 1
        row_numbers = (numbers.value, numbers.grad_norm, numbers.step_norm, numbers.diagnostics)
        row = _history_row(self.num_steps, row_numbers, self.objective)
        self.history.append(row)
        return row

    def result(self, reason: str, converged: bool) -> MinimizeResult:
        return MinimizeResult(
            params=self.params,
            value=self.value,
            grad=self.grad,
            grad_norm=tree.overflow_safe_norm(self.grad),
            num_steps=self.num_steps,
            num_value_evals=self.objective.num_value_evals,
            num_grad_evals=self.objective.num_grad_evals,
            num_hvp_evals=self.objective.num_hvp_evals,
            converged=converged,
            reason=reason,
            state=self.state,
            history=self.history,
        )


_MINUS_INF = "unbounded: the value reached -inf; returned the last finite point"


def _run_steps(
    run: _Run,
    optimizer: Transform,
    extra: dict[str, Any],
    rules: StopRules,
    max_steps: int,
    callback: Callable[[dict[str, float], PyTree], bool | None] | None,
    show: Callable[[dict[str, float]], None],
    device: torch.device,
) -> tuple[str, bool, tuple | None]:
    """The loop of :func:`minimize` from ``run``'s point, which it moves step by step;
    ``(reason, converged, incumbent)``. ``run`` is left at the last good point when
    anything raises."""
    incumbent = None  # the best point an exploring optimizer published (params, value)
    while run.num_steps < max_steps:
        params, objective = run.params, run.objective
        kwargs = dict(extra, value=run.value, grad=run.grad, value_fn=objective)
        updates, state, published = update_and_publish(
            optimizer, run.grad, run.state, params, **kwargs
        )
        if "incumbent_params" in published:
            incumbent = (published["incumbent_params"], published.get("incumbent_value"))
        new_params = apply_updates(params, updates)
        reuse = reusable(published, objective, new_params)
        new_value, new_grad = reuse if reuse is not None else value_and_grad(objective)(new_params)
        numbers = read_step(
            new_value, new_grad, updates, new_params, params, published, rules.xtol > 0, device
        )
        if not math.isfinite(numbers.value):
            run.num_steps += 1
            if numbers.value == -math.inf:
                return _MINUS_INF, False, incumbent
            return "non-finite value: returned the last finite point", False, incumbent
        old_value = run.value_host
        row = run.commit(new_params, new_value, new_grad, state, numbers)
        show(row)
        run.streaks = run.streaks.after(numbers, old_value, rules.eps)
        reason, converged = stop_reason(numbers, old_value, rules, run.streaks)
        if reason is not None and not converged:
            return reason, False, incumbent
        if callback is not None and callback(row, run.params):
            return "callback", converged, incumbent  # it sees the converged step too
        if converged:
            return reason, True, incumbent
    return "max_steps", False, incumbent


def minimize(
    value_fn: Callable[[PyTree], torch.Tensor],
    params: PyTree,
    optimizer: Transform,
    *,
    max_steps: int = 1000,
    gtol: float = 1e-5,
    gtol_rel: float = 0.0,
    ftol: float = 0.0,
    xtol: float = 0.0,
    state: Any = None,
    callback: Callable[[dict[str, float], PyTree], bool | None] | None = None,
    progress: bool = False,
    extra: dict[str, Any] | None = None,
    args: tuple = (),
    adjoint: str | None = None,
    check_every: int | None = 1,
    compile: bool = False,
) -> MinimizeResult:
    """Minimize the scalar ``value_fn(params)`` with ``optimizer`` from ``params``.

    Args:
      value_fn: params -> 0-d loss tensor (bind data with ``functools.partial``).
      params: the starting pytree of floating tensors (not modified; detached).
      optimizer: a :class:`~soo_func.Transform`, e.g. ``chain(lbfgs(), wolfe())``.
      max_steps: the most optimizer steps (of this call, a resumed run counts afresh).
      gtol: stop when the gradient's infinity norm is at most ``gtol`` (absolute).
      gtol_rel: stop when the gradient's infinity norm is at most ``gtol_rel`` times the
        start's (0 disables): the scale-free rule, for objectives far from unit scale
        (pass ``gtol=0`` with it, as an objective scaled by 1e-30 meets any absolute
        ``gtol`` at the start).
      ftol: stop when the relative decrease of the value is at most ``ftol`` (0 disables).
        Steps that a trust region or Levenberg-Marquardt rejected (zero steps) are not tested.
      xtol: stop when an accepted step is at most ``xtol * (||params|| + xtol)``
        (``scipy.optimize.least_squares``' rule; 0 disables).
      state: the optimizer's state at ``params`` to continue from (a previous result's or
        an exception's ``partial_result.state``); ``None``: ``optimizer.init(params)``.
      callback: ``callback(row, params)`` after each step; returning ``True`` stops.
      progress: show a progress bar (tqdm) with the value and gradient norm.
      extra: more keyword extras for ``update`` (e.g. ``residual_fn``).
      args: extra arguments of the objective, ``value_fn(params, *args)`` (tensors or
        pytrees); the solve sees them detached.
      adjoint: ``None`` (a detached result) or ``"implicit"``: ``result.params`` and
        ``result.value`` differentiable with respect to ``args`` through the optimality
        condition (:mod:`soo_func.drivers.adjoint`); ``"unrolled"``: through the recorded
        steps (:mod:`soo_func.drivers.unrolled`; memory grows with the steps).
      check_every: ``1`` (default): the host loop above, one host read a step. ``None``:
        the sync-free loop (:mod:`soo_func.drivers.sync_free`), exactly ``max_steps``
        steps without a host read, a stopped problem frozen by a mask, so that
        ``torch.func.vmap`` batches whole solves; ``k``: that loop, stopping at the first
        host read (one every ``k`` steps) that finds the problem stopped. The sync-free
        loop's result holds tensors (see :class:`MinimizeResult`); it takes no
        ``callback`` or ``progress``, and returns no incumbent.
      compile: run the sync-free loop (``check_every=1`` then reads the host every step)
        with its step compiled once by ``torch.compile`` (``fullgraph=True``, or with
        graph breaks and a warning where the optimizer does not trace whole).

    The stopping rules and their order are those of :mod:`soo_func.drivers.stopping`.
    An exception raised by ``value_fn`` or the optimizer (``KeyboardInterrupt`` too)
    propagates with ``err.partial_result``, the :class:`MinimizeResult` at the last good
    point (reason ``"interrupted: <ExcType>"``).
    """
    check_params(params)
    check_transform("minimize", optimizer)
    check_adjoint("minimize", adjoint, args)
    if check_every is not None:
        refuse_vmap(
            "minimize",
            f"whether the problem stopped (check_every={check_every!r})",
            "Under vmap pass check_every=None (the sync-free loop), or use "
            "sf.batched_minimize / sf.batched_least_squares",
        )
    if adjoint == "unrolled":  # autograd records the steps: soo_func.drivers.unrolled
        options = dict(max_steps=max_steps, gtol=gtol, gtol_rel=gtol_rel, ftol=ftol, xtol=xtol)
        options.update(state=state, callback=callback, extra=extra)
        return minimize_unrolled(value_fn, params, optimizer, args, options)
    params = tree.map_leaves(torch.Tensor.detach, params)
    objective = CountedObjective(bind_args(value_fn, args))
    state = optimizer.init(params) if state is None else state
    loop = (max_steps, check_every, compile, callback is not None or progress)
    tols = (gtol, gtol_rel, ftol, xtol)
    if check_every != 1 or compile:
        result = minimize_sync_free(objective, params, optimizer, state, extra, tols, loop)
    else:
        hooks = (max_steps, callback, progress)
        result = _minimize_on_host(objective, params, optimizer, state, extra, tols, hooks)
    return with_adjoint(result, value_fn, args, adjoint)


def _minimize_on_host(
    objective: CountedObjective,
    params: PyTree,
    optimizer: Transform,
    state: Any,
    extra: dict[str, Any] | None,
    tols: tuple[float, float, float, float],
    hooks: tuple[int, Callable | None, bool],
) -> MinimizeResult:
    """The host loop of :func:`minimize` (one host read a step); ``tols`` is ``(gtol,
    gtol_rel, ftol, xtol)``, ``hooks`` ``(max_steps, callback, progress)``."""
    max_steps, callback, progress = hooks
    value, grad = value_and_grad(objective)(params)
    check_finite_start(value, grad)
    device = tree.leaves(params)[0].device
    value_host, grad_norm, grad_inf = read_scalars(
        [value, tree.norm(grad), tree.norm(grad, math.inf)], device
    )
    eps = torch.finfo(value.dtype).eps
    rules = start_rules(value_host, grad_inf, tols, eps, HOST_OPS)
    history = [_history_row(0, (value_host, host_norm(grad, grad_norm), 0.0, {}), objective)]
    run = _Run(objective, params, value, grad, value_host, state, history)
    if grad_inf <= rules.gtol or grad_inf <= rules.gtol_rel_bound:
        return run.result("gtol" if grad_inf <= rules.gtol else "gtol_rel", True)
    try:
        reason, converged, incumbent = _run_steps(
            run, optimizer, dict(extra or {}), rules, max_steps, callback,
            _progress_printer(progress), device,
        )  # fmt: skip
    except BaseException as err:
        attach_partial_result(err, run.result(f"interrupted: {type(err).__name__}", False))
        raise
    better = None if converged else _incumbent_if_better(incumbent, run.value_host, objective)
    if better is None:
        return run.result(reason, converged)
    run.params, run.value, run.grad = better
    run.state = None
    return run.result(
        reason + "; returned the optimizer's incumbent (its best point, lower than the last); "
        "state is None (the optimizer's state belongs to the last point)",
        False,
    )
