"""Mini-batch helpers: a loss bound to a batch, subsampled curvature, one training step.

In a training loop every soo_func optimizer sees the loss on the current batch as
its objective: ``value_fn = bind_batch(loss_fn, batch)`` turns
``loss_fn(params, batch)`` into ``params -> 0-d loss`` (what ``value_fn`` means in
the protocol), so a line search, a trust region or a Levenberg-Marquardt step works
on that batch unchanged.

Subsampled curvature (Byrd, Chin, Neveitt and Nocedal 2011, "On the use of
stochastic Hessian information in optimization methods for machine learning"): the
gradient comes from a batch ``S`` and the curvature products from a smaller
subsample ``H`` of ``S``, since a product costs about as much as a gradient but its
noise hurts the step far less. :func:`hessian_operator` gives ``v -> H_H v`` and
:func:`ggn_operator` the generalized Gauss-Newton product ``v -> J^T H_L J v``
(Schraudolph 2002; Martens 2010, sec. 4.2), both on the subsample, as
``curvature`` extra for :func:`soo_func.stochastic.hessian_free`, ``levenberg`` and
``trust_region``. Both are the batch form of the one Hessian and the one Gauss-Newton
operator of :mod:`soo_func.oracles` (:func:`~soo_func.oracles.hvp_operator`,
:func:`~soo_func.oracles.ggn_operator`), counted by the same rule.

:func:`training_step` runs one functional step of any transform on one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from soo_func import oracles, tree
from soo_func.base import Transform, apply_updates, check_transform
from soo_func.oracles import ShardedFunction, value_and_grad

PyTree = Any
Batch = Any
Operator = Callable[[PyTree], PyTree]

__all__ = [
    "bind_batch",
    "cross_entropy_ggn_residual",
    "ggn_operator",
    "hessian_operator",
    "subsample",
    "training_step",
]


def bind_batch(loss_fn: Callable[[PyTree, Batch], torch.Tensor], batch: Batch) -> Callable:
    """``params -> loss_fn(params, batch)``: the batch loss as a protocol ``value_fn``."""
    if not callable(loss_fn):
        raise TypeError(f"bind_batch: loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(loss_fn, ShardedFunction):  # this rank's part of the batch, reduced
        return loss_fn.bind(batch)

    def value_fn(params: PyTree) -> torch.Tensor:
        return loss_fn(params, batch)

    return value_fn


def _batch_len(batch: Batch) -> int:
    sizes = {leaf.shape[0] for leaf in tree.leaves(batch) if isinstance(leaf, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(
            f"batch leaves must share their leading (example) dimension, got sizes {sorted(sizes)}"
        )
    return sizes.pop()


def subsample(batch: Batch, size: int | float) -> Batch:
    """The first ``size`` examples of ``batch`` (a fraction when ``size`` is a float in (0, 1]).

    Batches are drawn in random order, so the leading examples are a uniform subsample
    (Byrd et al. 2011 take the curvature sample ``H`` as a subset of ``S``).
    """
    n = _batch_len(batch)
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ValueError(f"subsample fraction must be in (0, 1], got {size}")
        size = max(1, round(size * n))
    if size < 1:
        raise ValueError(f"subsample size must be >= 1, got {size}")
    size = min(size, n)
    return tree.map_leaves(lambda t: t[:size] if isinstance(t, torch.Tensor) else t, batch)


def hessian_operator(
    loss_fn: Callable[[PyTree, Batch], torch.Tensor], params: PyTree, batch: Batch
) -> Operator:
    """``v -> H v`` with ``H`` the Hessian of ``loss_fn(., batch)`` at ``params``.

    :func:`soo_func.oracles.hvp_operator` with the batch bound, forward-over-reverse
    (``jvp`` of ``grad``): one product per call.
    """
    return oracles.hvp_operator(loss_fn, params, batch, mode="forward-over-reverse")


def ggn_operator(
    apply_fn: Callable[[PyTree, torch.Tensor], torch.Tensor],
    output_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: PyTree,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> Operator:
    """``v -> G v = J^T H_L J v``: the generalized Gauss-Newton matrix on ``batch``.

    ``apply_fn(params, inputs) -> outputs`` is the network, ``output_loss(outputs,
    targets) -> 0-d`` the (convex in the outputs) loss, ``J`` the Jacobian of the
    outputs in the params and ``H_L`` the Hessian of the loss in the outputs
    (Schraudolph 2002, eq. 7; Martens 2010, sec. 4.2). For the mean cross-entropy,
    ``H_L = (diag(p) - p p^T) / batch_size`` per example, so ``G`` is positive
    semidefinite, unlike the Hessian. It is :func:`soo_func.oracles.ggn_operator` on
    ``apply_fn(., inputs)``: ``J v`` is one ``jvp``, ``H_L u`` a product on the small
    output space and ``J^T w`` one ``vjp`` through a graph kept for all calls.
    """
    inputs, targets = batch
    _, product = oracles.ggn_operator(
        apply_fn, params, lambda outputs: output_loss(outputs, targets), inputs
    )
    return product


def cross_entropy_ggn_residual(
    apply_fn: Callable[[PyTree, torch.Tensor], torch.Tensor],
    params: PyTree,
    inputs: torch.Tensor,
) -> Callable[[PyTree], torch.Tensor]:
    """A ``residual_fn`` whose Gauss-Newton matrix ``J_r^T J_r`` at ``params`` is the GGN of
    the mean softmax cross-entropy of ``apply_fn(., inputs)``.

    Per example, the cross-entropy's Hessian in the logits factors as
    ``diag(p) - p p^T = A^T A`` with ``A = diag(sqrt p) - sqrt(p) p^T`` (using
    ``sum p = 1``), so ``r(w) = A z(w) / sqrt(N)`` with ``A`` frozen at ``params`` has
    ``J_r^T J_r = J^T H_L J``. This lets a ``residual_fn``-based Gauss-Newton direction
    (``gauss_newton()``, ``levenberg_marquardt``) use the classification GGN on a batch.
    Only its Jacobian at ``params`` is meaningful: ``0.5 |r|^2`` is *not* the loss, so
    pass the true ``value_fn``, ``value`` and ``grad`` alongside.
    """
    with torch.no_grad():
        probs = torch.softmax(apply_fn(params, inputs), dim=-1)
    root = probs.sqrt()
    factor = torch.diag_embed(root) - root.unsqueeze(-1) * probs.unsqueeze(-2)
    inv_sqrt_n = 1.0 / math.sqrt(inputs.shape[0])

    def residual_fn(p: PyTree) -> torch.Tensor:
        logits = apply_fn(p, inputs)
        return (inv_sqrt_n * torch.einsum("nij,nj->ni", factor, logits)).reshape(-1)

    return residual_fn


def training_step(
    optimizer: Transform,
    loss_fn: Callable[[PyTree, Batch], torch.Tensor],
    params: PyTree,
    state: Any,
    batch: Batch,
    **extra: Any,
) -> tuple[PyTree, Any, torch.Tensor]:
    """One step of ``optimizer`` on ``batch``: returns ``(new_params, new_state, loss)``.

    The loss is bound to the batch (:func:`bind_batch`) and its value and gradient
    passed as the extras ``value``, ``grad`` and ``value_fn``; further extras (a
    ``curvature`` operator on a subsample, an ``overlap_value_fn``) are passed on. Pure: no
    input is modified.
    """
    check_transform("training_step", optimizer)
    value_fn = bind_batch(loss_fn, batch)
    value, grad = value_and_grad(value_fn)(params)
    updates, state = optimizer.update(
        grad, state, params, value=value, grad=grad, value_fn=value_fn, **extra
    )
    return apply_updates(params, updates), state, value
