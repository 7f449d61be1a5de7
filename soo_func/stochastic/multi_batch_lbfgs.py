"""Multi-batch L-BFGS (Berahas, Nocedal and Takac 2016, "A multi-batch L-BFGS method for
machine learning", NeurIPS).

Consecutive batches ``S_k`` and ``S_{k+1}`` share an overlap ``O_k``; the curvature pair
is measured on the overlap only, with one function at both points,

    s_k = w_{k+1} - w_k,    y_k = grad F_{O_k}(w_{k+1}) - grad F_{O_k}(w_k),

so that ``y_k`` measures curvature and not the change of sample (with pairs from two
different batches, ``s^T y`` can be negative and the update unstable). The direction is
the L-BFGS two-loop recursion (Nocedal and Wright, Algorithm 7.4) with
``H_0 = gamma I``, ``gamma = s^T y / y^T y`` (eq. 7.20), applied to the batch gradient,
and the step is ``learning_rate * d`` (the paper's fixed step length). A pair with
``s^T y <= curvature_eps * s^T s`` is skipped (masked, no host sync).

Use :func:`overlapping_batches` to draw batches whose consecutive members overlap, and
pass ``overlap_value_fn = bind_batch(loss_fn, batch_overlap(batch, overlap_size))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, require_extras
from soo_func.oracles import value_and_grad

PyTree = Any

__all__ = ["MultiBatchLBFGSState", "batch_overlap", "multi_batch_lbfgs", "overlapping_batches"]


class MultiBatchLBFGSState(NamedTuple):
    """Ring buffers ``s``, ``y`` (``[memory_size, n]``), ``rho = 1 / s^T y`` (0 in empty or
    skipped slots), ``gamma`` (0-d), ``head`` (next slot, 0-d int) and ``num_skipped``."""

    s: torch.Tensor
    y: torch.Tensor
    rho: torch.Tensor
    gamma: torch.Tensor
    head: torch.Tensor
    num_skipped: torch.Tensor


def overlapping_batches(
    num_examples: int,
    batch_size: int,
    overlap: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """Index batches over one shuffled epoch where batch ``k``'s last ``overlap`` indices are
    batch ``k + 1``'s first ones (Berahas et al. 2016, sec. 2, the overlap ``O_k``)."""
    if not 0 < overlap < batch_size <= num_examples:
        raise ValueError(
            "overlapping_batches needs 0 < overlap < batch_size <= num_examples, got "
            f"overlap={overlap}, batch_size={batch_size}, num_examples={num_examples}"
        )
    order = torch.randperm(num_examples, generator=generator).to(device)
    stride = batch_size - overlap
    for start in range(0, num_examples - batch_size + 1, stride):
        yield order[start : start + batch_size]


def batch_overlap(batch: Any, overlap: int) -> Any:
    """The last ``overlap`` examples of ``batch``: the overlap ``O_k`` with the next batch."""
    return tree.map(lambda t: t[-overlap:] if isinstance(t, torch.Tensor) else t, batch)


def multi_batch_lbfgs(
    memory_size: int = 10, learning_rate: float = 1.0, curvature_eps: float = 1e-8
) -> Transform:
    """Multi-batch L-BFGS step ``learning_rate * (-H_k g)`` with overlap curvature pairs.

    Extras: ``overlap_value_fn`` (required: the loss on the overlap of this batch and the
    next one) and ``grad`` (the batch gradient; the incoming updates otherwise).
    Each step costs two gradients on the overlap.
    """
    if not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"multi_batch_lbfgs: memory_size must be an int >= 1, got {memory_size!r}")
    if not learning_rate > 0:
        raise ValueError(f"multi_batch_lbfgs: learning_rate must be positive, got {learning_rate}")
    if not curvature_eps >= 0:
        raise ValueError(f"multi_batch_lbfgs: curvature_eps must be >= 0, got {curvature_eps}")

    def init(params: PyTree) -> MultiBatchLBFGSState:
        flat = tree.ravel(params).flat
        zeros = torch.zeros((memory_size, flat.numel()), dtype=flat.dtype, device=flat.device)
        scalar = torch.zeros((), dtype=flat.dtype, device=flat.device)
        count = torch.zeros((), dtype=torch.int64, device=flat.device)
        return MultiBatchLBFGSState(
            zeros, zeros.clone(), torch.zeros_like(zeros[:, 0]), scalar + 1, count, count.clone()
        )

    def update(updates, state: MultiBatchLBFGSState, params=None, **extra):
        require_extras("multi_batch_lbfgs", extra, "overlap_value_fn")
        if params is None:
            raise TypeError("multi_batch_lbfgs needs params in update(updates, state, params, ...)")
        grad = extra.get("grad")
        grad = updates if grad is None else grad
        raveled = tree.ravel(grad)
        direction = -two_loop(raveled.flat, state)
        step = tree.unravel(learning_rate * direction, raveled)

        overlap_grad = value_and_grad(extra["overlap_value_fn"])
        _, g_old = overlap_grad(params)
        _, g_new = overlap_grad(tree.add(params, step))
        s = learning_rate * direction
        y = tree.ravel(g_new).flat - tree.ravel(g_old).flat
        return step, add_pair(state, s, y, curvature_eps)

    return Transform(init, update)


def two_loop(grad: torch.Tensor, state: MultiBatchLBFGSState) -> torch.Tensor:
    """``H_k grad`` by the two-loop recursion (Nocedal and Wright, Algorithm 7.4).

    Slots are visited newest first; empty or skipped ones have ``rho = 0`` and change nothing.
    """
    m = state.s.shape[0]
    order = torch.remainder(state.head - 1 - torch.arange(m, device=grad.device), m)
    q = grad
    alphas = []
    for k in range(m):
        i = order[k]
        alpha = state.rho[i] * torch.dot(state.s[i], q)
        q = q - alpha * state.y[i]
        alphas.append(alpha)
    r = state.gamma * q
    for k in reversed(range(m)):
        i = order[k]
        beta = state.rho[i] * torch.dot(state.y[i], r)
        r = r + (alphas[k] - beta) * state.s[i]
    return r


def add_pair(
    state: MultiBatchLBFGSState, s: torch.Tensor, y: torch.Tensor, curvature_eps: float
) -> MultiBatchLBFGSState:
    """Store ``(s, y)`` in the next slot when ``s^T y > curvature_eps * s^T s`` (masked)."""
    sy, yy, ss = torch.dot(s, y), torch.dot(y, y), torch.dot(s, s)
    accept = (sy > curvature_eps * ss) & (yy > 0) & torch.isfinite(sy)
    slot = state.head.reshape(1)
    new_s = torch.where(accept, state.s.index_copy(0, slot, s[None]), state.s)
    new_y = torch.where(accept, state.y.index_copy(0, slot, y[None]), state.y)
    safe_sy = torch.where(accept, sy, torch.ones_like(sy))
    new_rho = torch.where(
        accept, state.rho.index_copy(0, slot, (1 / safe_sy).reshape(1)), state.rho
    )
    gamma = torch.where(accept, sy / torch.where(accept, yy, torch.ones_like(yy)), state.gamma)
    m = state.s.shape[0]
    head = torch.where(accept, torch.remainder(state.head + 1, m), state.head)
    skipped = state.num_skipped + (~accept).to(torch.int64)
    return MultiBatchLBFGSState(new_s, new_y, new_rho, gamma, head, skipped)
