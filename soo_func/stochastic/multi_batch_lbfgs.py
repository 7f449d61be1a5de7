"""Multi-batch L-BFGS (Berahas, Nocedal and Takac 2016, "A multi-batch L-BFGS method for
machine learning", NeurIPS).

Consecutive batches ``S_k`` and ``S_{k+1}`` share an overlap ``O_k``; the curvature pair
is measured on the overlap only, with one function at both points,

    s_k = w_{k+1} - w_k,    y_k = grad F_{O_k}(w_{k+1}) - grad F_{O_k}(w_k),

so that ``y_k`` measures curvature and not the change of sample (with pairs from two
different batches, ``s^T y`` can be negative and the update unstable). The direction is
the L-BFGS two-loop recursion (Nocedal and Wright, Algorithm 7.4) with
``H_0 = gamma I``, ``gamma = s^T y / y^T y`` (eq. 7.20), applied to the batch gradient
(the kernel of :func:`~soo_func.directions.lbfgs.lbfgs`, on the same pair memory), and the
step is ``learning_rate * d`` (the paper's fixed step length). A pair with
``s^T y <= curvature_eps * s^T s`` (or a non-finite one) is skipped: it leaves the memory
as it was (masked, no host sync).

Use :func:`overlapping_batches` to draw batches whose consecutive members overlap, and
pass ``overlap_value_fn = bind_batch(loss_fn, batch_overlap(batch, overlap_size))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded, require_extras
from soo_func.directions import pair_memory as pm
from soo_func.directions.compact import newest_gamma, two_loop_coefficients
from soo_func.options import check_nonnegative, check_positive
from soo_func.oracles import value_and_grad

PyTree = Any

__all__ = ["MultiBatchLBFGSState", "batch_overlap", "multi_batch_lbfgs", "overlapping_batches"]


class MultiBatchLBFGSState(NamedTuple):
    """The pair memory (the ``memory_size`` newest accepted pairs, oldest first; see
    :class:`~soo_func.directions.pair_memory.PairMemory`) and ``num_skipped`` (0-d int,
    pairs rejected so far)."""

    memory: pm.PairMemory
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
    return tree.map_leaves(lambda t: t[-overlap:] if isinstance(t, torch.Tensor) else t, batch)


def multi_batch_lbfgs(
    memory_size: int = 10, learning_rate: float = 1.0, curvature_eps: float = 1e-8
) -> Transform:
    """Multi-batch L-BFGS step ``learning_rate * (-H_k g)`` with overlap curvature pairs.

    Extras: ``overlap_value_fn`` (required: the loss on the overlap of this batch and the
    next one) and ``grad`` (the batch gradient; the incoming updates otherwise).
    Each step costs two gradients on the overlap.
    """
    pm.check_memory_size("multi_batch_lbfgs", memory_size)
    check_positive("multi_batch_lbfgs", "learning_rate", learning_rate)
    check_nonnegative("multi_batch_lbfgs", "curvature_eps", curvature_eps)

    def accept_rule(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Berahas et al.'s skip rule: keep the new pair when ``s^T y > eps s^T s``."""
        del valid
        ss, sy, yy = gram[memory_size - 1, memory_size - 1], gram[memory_size - 1, -1], gram[-1, -1]
        return (sy > curvature_eps * ss) & (yy > 0)

    def init(params: PyTree) -> MultiBatchLBFGSState:
        flat = tree.ravel(params).flat
        memory = pm.init_memory(memory_size, flat.numel(), flat.dtype, flat.device)
        return MultiBatchLBFGSState(memory, torch.zeros((), dtype=torch.int64, device=flat.device))

    def update(updates, state: MultiBatchLBFGSState, params=None, **extra):
        require_extras("multi_batch_lbfgs", extra, "overlap_value_fn")
        if params is None:
            raise TypeError("multi_batch_lbfgs needs params in update(updates, state, params, ...)")
        grad = extra.get("grad")
        grad = updates if grad is None else grad
        raveled = tree.ravel(grad)
        s = -learning_rate * inverse_hessian_product(state.memory, raveled.flat)
        step = tree.unravel(s, raveled)

        overlap_grad = value_and_grad(extra["overlap_value_fn"])
        _, g_old = overlap_grad(params)
        _, g_new = overlap_grad(tree.add(params, step))
        y = tree.ravel(g_new).flat - tree.ravel(g_old).flat
        memory, accepted = pm.push_pair(
            state.memory, (s, y), accept_rule, rejected_takes_slot=False
        )
        return step, MultiBatchLBFGSState(memory, state.num_skipped + (~accepted).long())

    return guarded("multi_batch_lbfgs", Transform(init, update), MultiBatchLBFGSState)


def inverse_hessian_product(memory: pm.PairMemory, grad: torch.Tensor) -> torch.Tensor:
    """``H grad`` by the two-loop recursion (Nocedal and Wright, Algorithm 7.4) with
    ``H_0 = gamma I`` (eq. 7.20); ``grad`` itself while the memory is empty."""
    m = memory.valid.shape[0]
    projected = pm.project(memory, grad)
    gamma = newest_gamma(memory.gram, memory.valid)
    coef = two_loop_coefficients(memory.gram, memory.valid, projected[:m], projected[m:], gamma)
    return pm.combine(memory, grad, gamma, coef)
