"""Shared pieces of the Krylov solvers: the result type, the frozen-state loop, helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from soo_func import tree

PyTree = Any
MatVec = Callable[[PyTree], PyTree]


class KrylovResult(NamedTuple):
    """What a Krylov solver returns (all scalars are 0-d tensors on ``b``'s device).

    ``model_change`` is set by Steihaug-CG only: ``m(x) - m(0)`` of the trust-region model.
    """

    x: PyTree
    num_iters: torch.Tensor
    num_matvecs: torch.Tensor
    residual_norm: torch.Tensor
    negative_curvature: torch.Tensor
    hit_boundary: torch.Tensor
    model_change: torch.Tensor | None = None


# --------------------------------------------------------------------------- helpers


def as_scalar(value: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


def first_leaf(b: PyTree) -> torch.Tensor:
    leaves = tree.leaves(b)
    if not leaves:
        raise ValueError("the right-hand side is an empty pytree")
    tree.check_tensor_leaves(b, "b")
    return leaves[0]


def total_size(b: PyTree) -> int:
    return sum(leaf.numel() for leaf in tree.leaves(b))


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (the result is then never used)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, 1, den))


def freeze(done: torch.Tensor, old: Any, new: Any) -> Any:
    """``old`` where ``done`` else ``new``, for every tensor of two like-shaped states."""
    return optree.tree_map(lambda a, b: torch.where(done, a, b), old, new)


def check_options(who: str, max_iters, rtol, atol, check_every) -> None:
    if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 0):
        raise ValueError(f"{who}: max_iters must be a non-negative int or None, got {max_iters!r}")
    # A tensor rtol (a forcing term computed on the device) is not checked: no host sync.
    if (not isinstance(rtol, torch.Tensor) and rtol < 0) or atol < 0:
        raise ValueError(f"{who}: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(
            f"{who}: check_every must be a positive int (sync every that many iterations) or "
            f"None (never sync), got {check_every!r}"
        )


class UnitScale(NamedTuple):
    """A power of two ``s >= 1`` with ``max |b / s| < 2`` when ``max |b| >= 2`` (else 1).

    The solvers work on ``A (x / s) = b / s``: dividing by a power of two is exact in binary
    floating point, and every operation of a solve is linear in ``b``, so the iterates are
    the unscaled ones divided by ``s``, bit for bit, while the squares and dot products
    (``r^T r``, ``r^T A r``) stay far from overflow (a float32 gradient of 1e25).
    """

    s: torch.Tensor

    @staticmethod
    def of(b: PyTree) -> UnitScale:
        big = tree.norm(b, float("inf"))
        _, exponent = torch.frexp(big)
        power = torch.ldexp(torch.ones_like(big), exponent - 1)
        return UnitScale(torch.where(torch.isfinite(big) & (big >= 2), power, torch.ones_like(big)))

    def down(self, x: PyTree | None) -> PyTree | None:
        return None if x is None else tree.map_leaves(lambda t: t / self.s, x)

    def up(self, x: PyTree) -> PyTree:
        return tree.map_leaves(lambda t: t * self.s, x)


def tolerance(b_norm: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    return torch.clamp(rtol * b_norm, min=atol)


Monitor = Callable[[int, Any], torch.Tensor]
"""``(k, state) -> 0-d bool``: called after iteration ``k`` (1-based) with the (possibly
frozen) state; true stops the solver there (the state is frozen from then on)."""


def iterate(
    step: Callable[[Any], Any],
    state: Any,
    max_iters: int,
    check_every: int | None,
    monitor: Monitor | None = None,
) -> tuple[Any, int]:
    """Run ``step`` up to ``max_iters`` times, freezing the state once ``state.done``.

    The state is read on the host every ``check_every`` iterations to stop early, except
    where :func:`soo_func.tree.host_reads_allowed` says no (``torch.compile``, ``vmap``):
    there all ``max_iters`` iterations run and the frozen ones change nothing.

    ``monitor``, when given, may stop the iteration too (a caller's stopping rule, by a
    mask: no host read). Returns the final state and the number of ``step`` calls
    (operator applications).
    """
    trips = 0
    if not tree.host_reads_allowed():
        check_every = None  # traced or vmapped: every iteration runs, frozen once done
    for k in range(max_iters):
        if check_every is not None and k % check_every == 0 and bool(state.done):
            break
        state = freeze(state.done, state, step(state))
        trips += 1
        if monitor is not None:
            state = state._replace(done=state.done | monitor(k + 1, state))
    return state, trips


def counter(ref: torch.Tensor, value: int = 0) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=ref.device)


def initial_residual(matvec: MatVec, b: PyTree, x0: PyTree | None) -> tuple[PyTree, PyTree, int]:
    """``(x0, r0 = b - A x0, matvecs used)``; no product when ``x0`` is ``None``."""
    if x0 is None:
        return tree.zeros_like(b), b, 0
    tree.check_same_structure(b, x0, names=("b", "x0"))
    return x0, tree.sub(b, matvec(x0)), 1
