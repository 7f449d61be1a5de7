"""The host loop of the batched solves, with compaction of the stopped problems.

A batch of independent problems runs the sync-free step (:mod:`soo_func.drivers.sync_free`)
under ``torch.func.vmap``, ``compact_every`` steps at a time. Between two rounds the loop
reads the batch's ``done`` mask on the host once and, when at most ``COMPACT_BELOW`` of the
round's problems still run, gathers those (their carry: params, value, gradient, optimizer
state, streaks; their stopping rules and their rows of the data) and runs the next round on
them alone; the dropped problems' tensors are written back into the whole batch's then (the
running ones' at the end). A stopped problem is frozen by the step anyway (its carry does
not change), so leaving it out, or in, changes no result: compaction only removes the work. The loop ends when every problem has
stopped or after ``max_steps`` steps. ``compact_every=None`` is one round of ``max_steps``
steps on the whole batch, with no host read.

The first round always runs the whole batch (the optimizer's state may fill caches, whose
shapes change, at its first step). Every later round's first step continues the problem's
run (``make_step(..., continues=True)``): the gathered carry is the one its last step
returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from soo_func import tree
from soo_func.base import Transform
from soo_func.drivers.frozen import thaw
from soo_func.drivers.result import MinimizeResult, attach_partial_result
from soo_func.drivers.sync_free import (
    SYNC_FREE_REASON,
    Tally,
    converged_code,
    make_step,
    start_carry,
)
from soo_func.oracles import CountedObjective

PyTree = Any
Bind = Callable[[tuple], tuple[CountedObjective, dict[str, Any]]]

__all__ = ["BatchedProblem", "solve_batched"]

COUNTS = ("num_value_evals", "num_grad_evals", "num_hvp_evals")

COMPACT_BELOW = 0.9
"""Compact between two rounds when at most this fraction of the round's problems runs."""


class BatchedProblem(NamedTuple):
    """What the loop solves: ``bind(args) -> (objective, extra)`` builds one problem's
    counted objective and the optimizer's extras from its arguments; ``args`` carry the
    batch at ``args_dims`` (an int or ``None`` for all, or one per argument)."""

    bind: Bind
    optimizer: Transform
    args: tuple
    args_dims: Any
    tols: tuple[float, float, float, float]


class Split:
    """A pytree's tensor leaves (what crosses a ``vmap`` boundary) and its other leaves,
    which are the same for every problem of the batch."""

    def __init__(self, value: PyTree):
        leaves, self.spec = optree.tree_flatten(value, none_is_leaf=True)
        self.mask = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        self.others = [None if m else leaf for leaf, m in zip(leaves, self.mask, strict=True)]
        self.tensors = [leaf for leaf, m in zip(leaves, self.mask, strict=True) if m]

    def rebuild(self, tensors: list[torch.Tensor]) -> PyTree:
        it = iter(tensors)
        leaves = [next(it) if m else o for m, o in zip(self.mask, self.others, strict=True)]
        return self.spec.unflatten(leaves)


def _arg_dims(problem: BatchedProblem) -> tuple:
    dims = problem.args_dims
    return tuple(dims) if isinstance(dims, tuple) else (dims,) * len(problem.args)


def _gather_args(args: tuple, dims: tuple, rows: torch.Tensor | None) -> tuple:
    """The arguments of the problems ``rows`` (all when ``None``)."""
    if rows is None:
        return args
    return tuple(
        arg if dim is None else tree.map_leaves(lambda x, d=dim: x.index_select(d, rows), arg)
        for arg, dim in zip(args, dims, strict=True)
    )


def _counts(objective: CountedObjective, extra: dict[str, Any]) -> dict[str, int]:
    """The counts of ``objective`` and, as ``residual_*``, of ``extra``'s counted residuals."""
    counts = {name: getattr(objective, name) for name in COUNTS}
    residual = extra.get("residual_fn")
    if isinstance(residual, CountedObjective):
        counts.update({f"residual_{name}": getattr(residual, name) for name in COUNTS})
    return counts


class _Rounds:
    """The vmapped start and rounds of one batched solve; ``counts`` sums one problem's
    counts over them (a ``vmap`` chunk calls the function once per chunk: the last call's
    counts are one problem's)."""

    def __init__(self, problem: BatchedProblem, chunk_size: int | None):
        self.problem, self.chunk_size = problem, chunk_size
        self.in_dims = (0, _arg_dims(problem))
        self.counts: dict[str, int] = {}
        self.split: Split | None = None

    def _chunk(self, batch: int) -> int | None:
        """``vmap``'s ``chunk_size`` for ``batch`` problems: ``None`` when one chunk holds
        them all (a chunked ``vmap`` splits the inputs and concatenates the outputs even
        for one chunk)."""
        size = self.chunk_size
        return None if size is None or batch <= size else size

    def _add(self, last: dict[str, dict[str, int]]) -> None:
        for name, count in last["counts"].items():
            self.counts[name] = self.counts.get(name, 0) + count

    def start(self, params: PyTree) -> list[torch.Tensor]:
        last: dict[str, Any] = {}

        def one(p: PyTree, a: tuple) -> list[torch.Tensor]:
            objective, extra = self.problem.bind(a)
            state = self.problem.optimizer.init(p)
            split = Split(start_carry(objective, p, state, self.problem.tols))
            last.update(split=split, counts=_counts(objective, extra))
            return split.tensors

        batch = tree.leaves(params)[0].shape[0]
        tensors = torch.func.vmap(one, self.in_dims, chunk_size=self._chunk(batch))(
            params, self.problem.args
        )
        self.split = last["split"]
        self._add(last)
        return tensors

    def run(self, tensors: list, args: tuple, steps: int, continues: bool) -> list:
        """``steps`` steps of every problem in ``tensors`` (their ``args``); the first step
        continues the run when ``continues``."""
        last: dict[str, Any] = {}
        split_in = self.split

        def one(ts: list[torch.Tensor], a: tuple) -> list[torch.Tensor]:
            carry, rules = split_in.rebuild(ts)
            objective, extra = self.problem.bind(a)
            tally, twin, twin_extra = Tally.of(objective, extra)
            first, later = (
                make_step(twin, self.problem.optimizer, twin_extra, rules, flag)
                for flag in (continues, True)
            )
            with tree.no_host_reads():
                for taken in range(steps):
                    carry = (later if taken > 0 else first)(carry)
                    tally.settle()
            split = Split((carry, rules))
            last.update(split=split, counts=_counts(objective, extra))
            return split.tensors

        chunk = self._chunk(tensors[0].shape[0])
        out = torch.func.vmap(one, self.in_dims, chunk_size=chunk)(tensors, args)
        self.split = last["split"]
        self._add(last)
        return out


def _scatter(full: list, rows: torch.Tensor, part: list, in_place: bool) -> list:
    """``full`` with the rows ``rows`` replaced by ``part``: written into ``full`` itself when
    ``in_place`` (the loop owns its tensors after the first scatter), else into a copy (the
    first round's outputs may share memory with each other or with the caller's params)."""
    out = []
    for whole, some in zip(full, part, strict=True):
        if whole.shape[1:] != some.shape[1:]:
            raise RuntimeError(
                "batched solve: the optimizer's state changed shape after its first step; "
                "pass compact_every=None"
            )
        out.append(
            whole.index_copy_(0, rows, some) if in_place else whole.index_copy(0, rows, some)
        )
    return out


class _Batch:
    """The whole batch's tensors ``full`` and the running part ``part`` (the rows ``rows`` of
    it; ``None``: all): a problem's tensors are written back into ``full`` once, when a
    compaction drops it, or at the end."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.full, self.part, self.rows, self.owned = tensors, tensors, None, False

    def ran(self, part: list[torch.Tensor]) -> None:
        """The part after a round (the whole batch while nothing was dropped)."""
        self.part = part
        if self.rows is None:
            self.full, self.owned = part, False

    def compact(self, running: torch.Tensor) -> None:
        """Keep the part's rows ``running`` (local indices); write the others back."""
        stopped = torch.ones(len(self.part[0]), dtype=torch.bool, device=running.device)
        stopped[running] = False
        dropped = torch.nonzero(stopped).reshape(-1)
        self._write(dropped)
        self.part = [t.index_select(0, running) for t in self.part]
        self.rows = running if self.rows is None else self.rows.index_select(0, running)

    def _write(self, local: torch.Tensor) -> None:
        rows = local if self.rows is None else self.rows.index_select(0, local)
        part = [t.index_select(0, local) for t in self.part]
        self.full, self.owned = _scatter(self.full, rows, part, self.owned), True

    def finish(self) -> list[torch.Tensor]:
        """The whole batch, the running part written back."""
        if self.rows is None:
            return self.part
        self._write(torch.arange(len(self.part[0]), device=self.rows.device))
        return self.full


def solve_batched(
    problem: BatchedProblem,
    params: PyTree,
    max_steps: int,
    compact_every: int | None,
    chunk_size: int | None,
) -> MinimizeResult:
    """Run the batch (module docstring) and return one result whose tensors have the batch
    dimension first; its counts are those of a problem that ran every step the loop ran.
    Between rounds the running problems are gathered only when at most ``COMPACT_BELOW``
    of the round's batch still runs (else the next round runs the same rows: the stopped
    ones are frozen). An exception propagates with ``err.partial_result``: the batch as
    the last completed round left it."""
    rounds = _Rounds(problem, chunk_size)
    batch = _Batch(rounds.start(params))
    try:
        _rounds_until_done(problem, rounds, batch, max_steps, compact_every)
    except BaseException as err:  # the objective raised, or KeyboardInterrupt
        attach_partial_result(err, _result(rounds, batch, type(err).__name__))
        raise
    return _result(rounds, batch)


def _rounds_until_done(
    problem: BatchedProblem,
    rounds: _Rounds,
    batch: _Batch,
    max_steps: int,
    compact_every: int | None,
) -> None:
    """The rounds of :func:`solve_batched`, until every problem stopped or ``max_steps``."""
    dims, taken = _arg_dims(problem), 0
    args = problem.args
    while taken < max_steps:
        steps = (
            max_steps - taken if compact_every is None else min(compact_every, max_steps - taken)
        )
        if taken > 0:
            carry, _ = rounds.split.rebuild(batch.part)
            running = torch.nonzero(~carry.done).reshape(-1)  # the round's one host read
            if running.numel() == 0:
                break
            if running.numel() <= COMPACT_BELOW * carry.done.numel():
                batch.compact(running)
                args = _gather_args(problem.args, dims, batch.rows)
        batch.ran(rounds.run(batch.part, args, steps, continues=taken > 0))
        taken += steps


def _result(rounds: _Rounds, batch: _Batch, error: str | None = None) -> MinimizeResult:
    """The batch's result as its last completed round left it (``error``: the exception
    that ended the run)."""
    carry, _ = rounds.split.rebuild(batch.finish())
    counts = rounds.counts
    grad_norm = torch.func.vmap(tree.overflow_safe_norm)(carry.grad)
    return MinimizeResult(
        params=carry.params,
        value=carry.value,
        grad=carry.grad,
        grad_norm=grad_norm,
        num_steps=carry.num_steps,
        num_value_evals=counts["num_value_evals"],
        num_grad_evals=counts["num_grad_evals"],
        num_hvp_evals=counts["num_hvp_evals"] + counts.get("residual_num_hvp_evals", 0),
        converged=converged_code(carry.code) if error is None else False,
        reason=SYNC_FREE_REASON if error is None else f"interrupted: {error}",
        state=torch.func.vmap(thaw)(carry.state, carry.rotations),
        history=[],
        num_residual_evals=counts.get("residual_num_value_evals", 0),
        reason_code=carry.code,
    )
