"""How the sync-free driver keeps a stopped problem where it stopped, without a host read.

Every step is computed for every problem; a problem that does not move (it had stopped, or
its new value is not finite) keeps its old carry by ``torch.where`` (:func:`freeze`). For
most of an optimizer's state that is a few passes over small tensors, but for the curvature
pairs of the limited-memory methods (:class:`~soo_func.directions.pair_memory.PairMemory`,
``m`` slots of two ``[n]`` vectors) a selection slot by slot reads every slot twice and writes it
once: about ``6 m n`` numbers a step, more than the L-BFGS direction itself costs
(``~4 m n``).

A push rebuilds the tuple of slots: the new memory's slots ``0..m-2`` *are* the old
memory's slots ``1..m-1`` (the same tensors) and slot ``m-1`` is the new pair. So the frozen
memory is kept as that same shifted tuple, with the old oldest slot ``P_0`` put back in the
last place instead of the new pair (one selection, ``3 · 2n`` numbers):
``(P_1, ..., P_{m-1}, where(move, new, P_0))``. A frozen memory is then the old one
*rotated* by one place (its Gram matrix and validity, selected as usual, stay in the old
order); the driver counts the rotations of each memory (:class:`Rotations`), and
:func:`thaw` turns the slots back once, after the loop, so that the returned state is the
one of the step where the problem stopped. A rotated memory is only ever read by the steps
whose results a frozen problem discards. Memories stored as one ``[m, 2, n]`` tensor (small
ones) and tuples that were not pushed by exactly one slot are selected as a whole.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from soo_func.directions.pair_memory import PairMemory

PyTree = Any
Rotations = tuple[torch.Tensor, ...]
"""One 0-d int64 per pair memory of the state (tree order): how many places it turned."""

__all__ = ["Rotations", "freeze", "freeze_state", "no_rotations", "thaw"]


def freeze(move: torch.Tensor, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``move`` holds, else ``old``, leaf by leaf. A leaf whose shape
    changed in the step (a cache filled at the first step) and a leaf that is not a tensor
    are taken from ``new``."""
    return optree.tree_map(lambda a, b: _select(move, a, b), new, old, none_is_leaf=True)


def _select(move: torch.Tensor, a: Any, b: Any) -> Any:
    if not isinstance(b, torch.Tensor):
        return a
    if isinstance(a, torch.Tensor) and a.shape != b.shape:
        return a
    return torch.where(move, a, b)


def _is_memory(node: Any) -> bool:
    return isinstance(node, PairMemory)


def no_rotations(state: PyTree, like: torch.Tensor) -> Rotations:
    """A zero count for each pair memory of ``state``, on ``like``'s device."""
    nodes = optree.tree_leaves(state, is_leaf=_is_memory, none_is_leaf=True)
    return tuple(
        torch.zeros((), dtype=torch.int64, device=like.device) for node in nodes if _is_memory(node)
    )


def _shifted_by_one(new: Any, old: Any) -> bool:
    """Whether the tuple ``new`` is ``old`` pushed by one slot (decided on the tensor
    objects, so while tracing too)."""
    if not (isinstance(new, tuple) and isinstance(old, tuple) and len(new) == len(old)):
        return False
    kept, dropped = optree.tree_leaves(new[:-1]), optree.tree_leaves(old[1:])
    return len(kept) == len(dropped) and all(a is b for a, b in zip(kept, dropped, strict=True))


def freeze_state(
    move: torch.Tensor, new: PyTree, old: PyTree, rotations: Rotations
) -> tuple[PyTree, Rotations]:
    """:func:`freeze` of an optimizer state, with the pair memories pushed by one slot kept
    by rotation (module docstring); returns the state and the updated rotation counts."""
    counts = iter(rotations)
    turned: list[torch.Tensor] = []

    def select(a: Any, b: Any) -> Any:
        if not _is_memory(a):
            return _select(move, a, b)
        count = next(counts)
        small = freeze(move, (a.gram, a.valid), (b.gram, b.valid))
        if _shifted_by_one(a.pairs, b.pairs):
            pairs = (*a.pairs[:-1], freeze(move, a.pairs[-1], b.pairs[0]))
            count = count + (~move).to(count.dtype)
        else:
            pairs = freeze(move, a.pairs, b.pairs)
        turned.append(count)
        return PairMemory(pairs, *small)

    state = optree.tree_map(select, new, old, is_leaf=_is_memory, none_is_leaf=True)
    return state, tuple(turned)


def thaw(state: PyTree, rotations: Rotations | tuple[int, ...]) -> PyTree:
    """``state`` with each pair memory's slots turned back by its rotation count: after
    ``r`` frozen steps slot ``i`` holds the pair of slot ``(i + r) mod m``.

    Counts read on the host (Python ints) reorder the tuple of slots (no copy); counts on
    the device select every slot of the stacked halves (a copy of the memory, no host read).
    """
    counts = iter(rotations)

    def turn_back(node: Any) -> Any:
        if not _is_memory(node):
            return node
        count = next(counts)
        if isinstance(node.pairs, torch.Tensor):  # a stacked memory is selected, never turned
            return node
        m = len(node.pairs)
        if isinstance(count, int):
            return node._replace(pairs=tuple(node.pairs[(i - count) % m] for i in range(m)))
        index = torch.remainder(torch.arange(m, device=count.device) - count, m)
        halves = [torch.stack(half)[index].unbind(0) for half in zip(*node.pairs, strict=True)]
        return node._replace(pairs=tuple(zip(*halves, strict=True)))

    return optree.tree_map(turn_back, state, is_leaf=_is_memory, none_is_leaf=True)
