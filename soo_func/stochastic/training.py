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

:func:`training_step` runs one functional step of any transform on one batch;
:func:`make_training_step` makes it a function of ``(params, state, batch)`` that builds its
extras from the batch, compiled once with ``torch.compile`` when asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
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
    "distinct_leaves",
    "ggn_operator",
    "hessian_operator",
    "make_training_step",
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
    ``sum p = 1``), so ``r(w) = A z(w) / sqrt(N)`` with ``A`` held constant (no gradient
    through it) has ``J_r^T J_r = J^T H_L J``. ``A`` is computed from the same forward pass
    as the logits ``z(w)`` (detached), so the residual costs one forward; at ``params``
    it is the factor of ``H_L`` there. This lets a ``residual_fn``-based Gauss-Newton
    direction (``gauss_newton()``, ``levenberg_marquardt``) use the classification GGN on a
    batch. Only its Jacobian at ``params`` is meaningful: ``0.5 |r|^2`` is *not* the loss,
    so pass the true ``value_fn``, ``value`` and ``grad`` alongside.
    """
    del params  # the factor is taken where the residual is evaluated: at params, by use
    inv_sqrt_n = 1.0 / math.sqrt(inputs.shape[0])

    def residual_fn(p: PyTree) -> torch.Tensor:
        logits = apply_fn(p, inputs)
        probs = torch.softmax(logits.detach(), dim=-1)
        root = probs.sqrt()
        factor = torch.diag_embed(root) - root.unsqueeze(-1) * probs.unsqueeze(-2)
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
    input is modified. To compile it, use :func:`make_training_step` (``compile=True``).
    """
    check_transform("training_step", optimizer)
    value_fn = bind_batch(loss_fn, batch)
    value, grad = value_and_grad(value_fn)(params)
    updates, state = optimizer.update(
        grad, state, params, value=value, grad=grad, value_fn=value_fn, **extra
    )
    return apply_updates(params, updates), state, value


TrainingStep = Callable[[PyTree, Any, Batch], tuple[PyTree, Any, torch.Tensor]]


def make_training_step(
    optimizer: Transform,
    loss_fn: Callable[[PyTree, Batch], torch.Tensor],
    extras_fn: Callable[[PyTree, Batch], dict[str, Any]] | None = None,
    *,
    compile: bool = False,
    backend: str = "inductor",
    fullgraph: bool = True,
) -> TrainingStep:
    """``step(params, state, batch) -> (new_params, new_state, loss)``: :func:`training_step`
    with the extras ``extras_fn(params, batch)`` (e.g. ``{"residual_fn":
    cross_entropy_ggn_residual(apply_fn, params, subsample(batch, 64)[0])}``), compiled with
    ``torch.compile`` when ``compile`` is true.

    The extras are built inside the step because a compiled function guards on the Python
    objects it is passed: a fresh closure per batch (a ``residual_fn``, a ``curvature``
    operator) as an argument would recompile it at every call.

    ``compile=True`` compiles the whole step (gradient, the optimizer's update, the new
    params) once, with ``dynamic=False`` and ``fullgraph`` (default ``True``: an optimizer
    that does not trace as one graph raises at the first call rather than running in
    pieces), and reuses it for every batch. The compiled step is specialized to the
    shapes, dtypes and devices of the params, the state and the batch, and to grad mode:
    a batch of another size (a shorter last batch: drop it or pad it), another dtype or
    device, or a state of another structure recompiles it (``TORCH_LOGS=recompiles``
    shows each one and its reason). Searches that decide on the host (``armijo``,
    ``wolfe``) read tensors in Python and do not compile as one graph; use the sync-free
    search (:func:`soo_func.armijo_sync_free`, nested ``torch.cond`` under compile: a step
    whose first trial is accepted evaluates it once), which decides on the device.
    A :class:`~soo_func.oracles.CountedObjective` as ``loss_fn`` would recompile it at every
    call (its host counters change, and the compiled step guards on them): pass the plain
    function.
    """
    check_transform("make_training_step", optimizer)

    def step(params: PyTree, state: Any, batch: Batch) -> tuple[PyTree, Any, torch.Tensor]:
        extra = {} if extras_fn is None else extras_fn(params, batch)
        return training_step(optimizer, loss_fn, params, state, batch, **extra)

    if not compile:
        return step
    # Inductor's layout optimization makes conv weights channels-last in the outer graph and
    # hands them to the torch.cond branches of the sync-free search, compiled for contiguous
    # ones (an assert_size_stride failure at the first call): it is turned off here.
    options = {"layout_optimization": False} if backend == "inductor" else None
    compiled = torch.compile(
        step, fullgraph=fullgraph, dynamic=False, backend=backend, options=options
    )

    def compiled_step(params: PyTree, state: Any, batch: Batch):
        return compiled(*distinct_leaves((params, state, batch)))

    return compiled_step


def distinct_leaves(inputs: PyTree) -> PyTree:
    """``inputs`` with a copy for every tensor leaf that is the same object as an earlier
    one. A compiled function guards on which of its inputs are one object: a state made by
    ``init`` with one zero tensor in several fields, and made by an update with distinct
    ones, would compile twice."""
    leaves, spec = optree.tree_flatten(inputs, none_is_leaf=True)
    seen: set[int] = set()
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) in seen:
                leaf = leaf.clone()
            seen.add(id(leaf))
        out.append(leaf)
    return spec.unflatten(out)
