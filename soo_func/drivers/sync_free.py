"""The sync-free driver: ``minimize(..., check_every=None)`` and ``least_squares(...,
check_every=None)``.

The loop runs exactly ``max_steps`` steps and never reads a tensor on the host. Whether a
problem has stopped is a 0-d bool tensor ``done``; every step is computed, and a stopped
problem's params, value, gradient, optimizer state and streaks are kept by
``torch.where`` (:mod:`soo_func.drivers.frozen`; the curvature pairs of the limited-memory
methods are kept by a rotation, undone once after the loop): a converged or failed problem
stops moving. The stopping rules are those
of the host driver, :func:`~soo_func.drivers.stopping.rule_flags` evaluated on tensors
(``DEVICE_OPS``), in the same order; a non-finite value freezes the problem at its last
finite point (``-inf`` reads as unbounded), and a non-finite start marks the problem
stopped where the host driver raises. Because nothing is read, the whole solve runs under
``torch.func.vmap``: a batch of problems (several starts, several data sets) gets its own
damping, acceptance and convergence per problem, with no coupling across the batch
(:mod:`soo_func.drivers.batched` wraps the pattern).

``check_every=k`` reads ``done`` on the host before the first step and after every ``k``
steps, and stops at the first read that finds the problem stopped: the result is the
``check_every=None`` result (the frozen steps change nothing), at up to ``k - 1`` wasted
steps. ``compile=True`` compiles the step once with ``torch.compile`` (``fullgraph=True``;
when the optimizer does not trace whole, with graph breaks and a warning) and reuses it.

The result's ``converged`` (0-d bool), ``num_steps`` (0-d int64, the steps taken before the
problem stopped) and ``reason_code`` (0-d int64 into :data:`REASON_NAMES`) are tensors;
``reason`` only says that, :func:`reason_names` reads the codes; ``history`` is empty.
The evaluation counts are those of every step the loop ran (a frozen problem is still
evaluated: under ``vmap`` the batch runs in lockstep). A compiled search that evaluates
inside ``torch.cond`` branches (``armijo_sync_free``) charges no host counter there; it
publishes those evaluations as ``uncharged_evals``, summed on the device and added to the
counts with one host read after the loop.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from soo_func import tree
from soo_func.base import Transform, apply_updates, update_and_publish
from soo_func.drivers.compiled_step import CompiledStep
from soo_func.drivers.frozen import Rotations, freeze, freeze_state, no_rotations, thaw
from soo_func.drivers.outcome import reusable
from soo_func.drivers.result import MinimizeResult, attach_partial_result
from soo_func.drivers.stopping import (
    CONVERGED_RULES,
    DEVICE_OPS,
    RULES,
    StepNumbers,
    StopRules,
    Streaks,
    changed,
    rule_flags,
    start_rules,
    stationarity,
)
from soo_func.options import check_int_at_least
from soo_func.oracles import CountedObjective, charge, value_and_grad

PyTree = Any

__all__ = [
    "GUARDED_CALLS",
    "REASON_NAMES",
    "SYNC_FREE_REASON",
    "Carry",
    "CompiledStep",
    "converged_code",
    "device_step",
    "minimize_sync_free",
    "reason_names",
    "settle_compiled_run",
    "start_carry",
]

REASON_NAMES = ("max_steps", *RULES, "non_finite_value", "minus_inf_value", "non_finite_start")
"""What a sync-free result's ``reason_code`` indexes: 0 ran all ``max_steps`` (or is still
running at a ``check_every`` read), then the rules of
:data:`~soo_func.drivers.stopping.RULES` in their order, then the non-finite stops."""

_CODE = {name: code for code, name in enumerate(REASON_NAMES)}
_CONVERGED_CODES = sorted(_CODE[name] for name in CONVERGED_RULES)

SYNC_FREE_REASON = (
    "sync-free run: the reason is not read on the host; see reason_code "
    "(soo_func.drivers.sync_free.reason_names(result) reads it)"
)


class Carry(NamedTuple):
    """What one sync-free step reads and returns (all tensors after the first step)."""

    params: PyTree
    value: torch.Tensor
    grad: PyTree
    state: Any
    done: torch.Tensor  # 0-d bool: stopped (converged or failed), so frozen
    code: torch.Tensor  # 0-d int64 into REASON_NAMES (0 while running)
    num_steps: torch.Tensor  # 0-d int64: steps taken before stopping
    streaks: Streaks  # 0-d tensors
    uncharged: torch.Tensor  # [values, gradients] int64: published ``uncharged_evals``
    rotations: Rotations  # per pair memory of ``state``: places turned while frozen


def converged_code(code: torch.Tensor) -> torch.Tensor:
    """Whether each ``reason_code`` is one of the converged rules' (no host read)."""
    return (code >= _CONVERGED_CODES[0]) & (code <= _CONVERGED_CODES[-1])


def reason_names(result: MinimizeResult) -> str | list:
    """The names of a sync-free result's ``reason_code`` (nested lists for a batch): one
    host read."""
    codes = result.reason_code.tolist()
    return optree.tree_map(lambda code: REASON_NAMES[code], codes)


def device_step(
    value: torch.Tensor,
    grad: PyTree,
    updates: PyTree,
    params: PyTree,
    old_params: PyTree,
    published: dict[str, Any],
    with_params_norm: bool,
) -> StepNumbers:
    """What the stopping rules read after a step, as 0-d tensors (no host read): the
    tensor twin of :func:`~soo_func.drivers.stopping.read_step`. ``has_search`` (whether
    the optimizer publishes ``search_failed``) is a bool; ``grad_norm`` is not read."""
    converged_ok, failed = (published.get(k) for k in ("converged_ok", "search_failed"))
    has_search = isinstance(failed, torch.Tensor)
    return StepNumbers(
        value=value.reshape(()),
        grad_norm=math.nan,
        grad_inf=stationarity(grad, published),
        step_norm=tree.norm(updates),
        params_norm=tree.norm(params) if with_params_norm else math.nan,
        has_search=has_search,
        params_changed=changed(params, old_params) if has_search else True,
        may_converge=converged_ok if isinstance(converged_ok, torch.Tensor) else True,
        search_failed=failed if has_search else False,
        diagnostics={},
    )


def _rule_code(flags: tuple[Any, ...], like: torch.Tensor) -> torch.Tensor:
    """The code (1 + index in ``RULES``) of the first flag that holds; 0 when none does."""
    code = torch.zeros((), dtype=torch.int64, device=like.device)
    for index in reversed(range(len(flags))):
        code = DEVICE_OPS.select(flags[index], index + 1, code)
    return torch.as_tensor(code, device=like.device)


def make_step(
    objective: CountedObjective,
    optimizer: Transform,
    extra: dict[str, Any],
    rules: StopRules,
    continues: bool = False,
) -> Callable[[Carry], Carry]:
    """One sync-free step: the host loop's step (update, apply, reuse the search's value
    and gradient or evaluate), its stopping rules on tensors, and the freeze of a problem
    that had stopped or whose new value is not finite.

    ``continues=True`` passes the ``continues`` extra: the carry is one a step of this run
    returned, so its params are the point the optimizer's last update published (moved to,
    or kept with the state by the freeze) and its functions are unchanged; an optimizer may
    then reuse what it cached there without a check (levenberg's Jacobian)."""
    promise = {"continues": True} if continues else {}

    def step(carry: Carry) -> Carry:
        kwargs = dict(extra, **promise, value=carry.value, grad=carry.grad, value_fn=objective)
        updates, state, published = update_and_publish(
            optimizer, carry.grad, carry.state, carry.params, **kwargs
        )
        new_params = apply_updates(carry.params, updates)
        reuse = reusable(published, objective, new_params)
        new_value, new_grad = reuse if reuse is not None else value_and_grad(objective)(new_params)
        numbers = device_step(
            new_value, new_grad, updates, new_params, carry.params, published, rules.xtol > 0
        )
        streaks = carry.streaks.after(numbers, carry.value, rules.eps, DEVICE_OPS)
        flags = rule_flags(numbers, carry.value, rules, streaks, DEVICE_OPS)
        finite = torch.isfinite(numbers.value)
        not_finite = torch.where(
            numbers.value == -math.inf, _CODE["minus_inf_value"], _CODE["non_finite_value"]
        )
        code = torch.where(finite, _rule_code(flags, numbers.value), not_finite)
        active = ~carry.done
        move = active & finite
        state, rotations = freeze_state(move, state, carry.state, carry.rotations)
        return Carry(
            params=tree.where(move, new_params, carry.params),
            value=torch.where(move, numbers.value, carry.value),
            grad=tree.where(move, new_grad, carry.grad),
            state=state,
            done=carry.done | (active & (code != 0)),
            code=torch.where(active, code, carry.code),
            num_steps=carry.num_steps + active.to(torch.int64),
            streaks=freeze(move, streaks, carry.streaks),
            uncharged=carry.uncharged + published.get("uncharged_evals", 0),
            rotations=rotations,
        )

    return step


def start_carry(
    objective: CountedObjective, params: PyTree, state: Any, tols: tuple
) -> tuple[Carry, StopRules]:
    """The first carry and the run's rules: a non-finite start is stopped (code
    ``non_finite_start``) where the host driver raises; a start that meets ``gtol`` or
    ``gtol_rel`` is stopped as converged."""
    value, grad = value_and_grad(objective)(params)
    value = value.reshape(())
    grad_inf = tree.norm(grad, math.inf)
    rules = start_rules(value, grad_inf, tols, torch.finfo(value.dtype).eps, DEVICE_OPS)
    finite = torch.isfinite(value) & tree.all_finite(grad).to(value.device)
    code = torch.zeros((), dtype=torch.int64, device=value.device)
    code = torch.where(grad_inf <= rules.gtol_rel_bound, _CODE["gtol_rel"], code)
    code = torch.where(grad_inf <= rules.gtol, _CODE["gtol"], code)
    code = torch.where(finite, code, _CODE["non_finite_start"])
    zero = torch.zeros((), dtype=torch.int64, device=value.device)
    streaks = Streaks(zero, zero, torch.full_like(value, math.inf))
    uncharged = torch.zeros(2, dtype=torch.int64, device=value.device)
    rotations = no_rotations(state, value)
    carry = Carry(params, value, grad, state, code != 0, code, zero, streaks, uncharged, rotations)
    return carry, rules


class Tally(NamedTuple):
    """The run's counted functions and the twins the steps call instead: each step counts
    on the twins from zero, then :meth:`settle` adds their counts to the run's and zeroes
    them. So the counters a compiled step reads are 0 at every call (``torch.compile``
    guards on the Python ints it reads: counters that grew would recompile the step) and
    the twins, made once, keep one identity (a Jacobian cache keyed on the function)."""

    pairs: tuple[tuple[CountedObjective, CountedObjective], ...]

    @staticmethod
    def of(objective: CountedObjective, extra: dict[str, Any]) -> tuple[Tally, Any, dict]:
        """The tally, the objective's twin and ``extra`` with twins of its counted
        functions (``least_squares``' ``residual_fn``)."""
        twins = {
            key: CountedObjective(fn)
            for key, fn in extra.items()
            if isinstance(fn, CountedObjective)
        }
        twin = CountedObjective(objective)
        pairs = ((objective, twin), *((extra[key], fn) for key, fn in twins.items()))
        return Tally(pairs), twin, {**extra, **twins}

    def settle(self) -> None:
        for counted, twin in self.pairs:
            for name in ("num_value_evals", "num_grad_evals", "num_hvp_evals"):
                setattr(counted, name, getattr(counted, name) + getattr(twin, name))
                setattr(twin, name, 0)


GUARDED_CALLS = 2
"""Compiled calls of a run made with dynamo's guards evaluated in full (see :func:`_loop`)."""


def _loop(
    steps: tuple[Callable, Callable],
    carry: Carry,
    tally: Tally,
    loop: tuple,
    interrupted: Callable[[BaseException, Carry], None],
) -> Carry:
    """Run up to ``max_steps`` steps, reading ``done`` on the host before the first step
    and after every ``check_every`` steps (never when ``None``): ``steps`` is the first
    step and the step that continues the run (:func:`make_step`), which is compiled (the
    first one fills what the optimizer's state fills once).

    A compiled graph is guarded: each call checks every input's metadata and the Python
    values it read (about a millisecond a step for an L-BFGS carry). After
    ``GUARDED_CALLS`` guarded calls of one graph, each call's input is the previous call's
    output, of the metadata the graph produced and already accepted, and the Python values
    are settled by the tally: the remaining calls skip the guards
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, scoped to this loop).
    An exception (from the objective, or ``KeyboardInterrupt``) is passed with the last
    completed step's carry to ``interrupted``, then re-raised.
    """
    max_steps, check_every, compile, _ = loop
    first, step = steps
    compiled = _compiled(step) if compile else None
    with contextlib.ExitStack() as stack:
        try:
            for taken in range(max_steps):
                if check_every is not None and taken % check_every == 0 and bool(carry.done.all()):
                    break
                if compiled is not None and taken == 1 + GUARDED_CALLS and compiled.whole:
                    stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
                    stack.enter_context(stance)
                later = compiled if compiled is not None else step
                carry = (later if taken > 0 else first)(carry)
                tally.settle()
        except BaseException as err:
            tally.settle()  # the failed step's evaluations were made
            interrupted(err, carry)
            raise
    return carry


def _compiled(step: Callable) -> CompiledStep | None:
    """``step`` compiled, or ``None`` with a warning inside a ``torch.func`` transform:
    ``torch.compile`` cannot trace from inside one (the step would run in pieces, slower
    than eager), only around it."""
    if not tree.in_functorch_transform():
        return CompiledStep(step)
    warnings.warn(
        "compile=True inside torch.func.vmap (or another torch.func transform): "
        "torch.compile cannot trace from inside one, so the steps run eagerly; compile "
        "around the transform instead (torch.compile(torch.func.vmap(step)))",
        stacklevel=5,
    )
    return None


def settle_compiled_run(
    objective: CountedObjective, carry: Carry, compiled: bool
) -> Rotations | tuple[int, ...]:
    """Add the run's ``uncharged_evals`` (evaluations a compiled search made inside
    ``torch.cond``, which charge no host counter) to ``objective``'s counts, and return the
    rotation counts to thaw the state with: one host read after the loop, made only for a
    compiled run outside ``torch.func`` transforms, which also gives the rotations as
    Python ints (so that :func:`~soo_func.drivers.frozen.thaw` reorders the slots instead
    of copying them). Eager and vmapped runs read nothing (their searches charge as they
    evaluate) and get the rotations on the device."""
    if not compiled or torch._C._are_functorch_transforms_active():
        return carry.rotations
    counts = torch.cat([carry.uncharged, *map(torch.atleast_1d, carry.rotations)])
    values, grads, *turns = counts.tolist()
    charge(objective, value=values, grad=grads)
    return tuple(turns)


def minimize_sync_free(
    objective: CountedObjective,
    params: PyTree,
    optimizer: Transform,
    state: Any,
    extra: dict[str, Any] | None,
    tols: tuple[float, float, float, float],
    loop: tuple[int, int | None, bool, bool],
) -> MinimizeResult:
    """The sync-free run of :func:`~soo_func.minimize` (module docstring). ``tols`` is
    ``(gtol, gtol_rel, ftol, xtol)``; ``loop`` is ``(max_steps, check_every, compile,
    host_hooks)``, where ``host_hooks`` says a ``callback`` or ``progress`` was asked for
    (refused: they read the host every step)."""
    check_every, host_hooks = loop[1], loop[3]
    if check_every is not None:
        check_int_at_least("minimize", "check_every", check_every, 1)
    if host_hooks:
        raise ValueError(
            "minimize: callback and progress read the host every step; they need "
            "check_every=1 and compile=False (the host loop)"
        )
    carry, rules = start_carry(objective, params, state, tols)
    tally, twin, extra = Tally.of(objective, dict(extra or {}))

    def interrupted(err: BaseException, last: Carry) -> None:
        if not tree.in_functorch_transform():  # a batched carry cannot leave the transform
            reason = f"interrupted: {type(err).__name__}"
            attach_partial_result(err, _result(objective, last, loop[2], reason, False))

    with tree.no_host_reads():
        steps = tuple(make_step(twin, optimizer, extra, rules, later) for later in (False, True))
        carry = _loop(steps, carry, tally, loop, interrupted)
    return _result(objective, carry, loop[2], SYNC_FREE_REASON, converged_code(carry.code))


def _result(
    objective: CountedObjective, carry: Carry, compiled: bool, reason: str, converged: Any
) -> MinimizeResult:
    """The run's result at ``carry`` (:func:`settle_compiled_run` first)."""
    rotations = settle_compiled_run(objective, carry, compiled)
    return MinimizeResult(
        params=carry.params,
        value=carry.value,
        grad=carry.grad,
        grad_norm=tree.overflow_safe_norm(carry.grad),
        num_steps=carry.num_steps,
        num_value_evals=objective.num_value_evals,
        num_grad_evals=objective.num_grad_evals,
        num_hvp_evals=objective.num_hvp_evals,
        converged=converged,
        reason=reason,
        state=thaw(carry.state, rotations),
        history=[],
        reason_code=carry.code,
    )
