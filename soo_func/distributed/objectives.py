"""Sharded functions whose oracles reduce across a ``torch.distributed`` group.

Each rank holds a shard of the data and the same (replicated) params. For a scalar
objective ``f(x) = sum_r f_r(x)`` (``reduce="sum"``) or ``(1/R) sum_r f_r(x)``
(``reduce="mean"``, equal shards) every oracle is linear in the shards:

    f = sum_r f_r,   grad f = sum_r grad f_r,   H v = sum_r H_r v,

so each rank computes its shard's value, gradient or product with the ordinary oracles
of :mod:`soo_func.oracles` and one all-reduce (value and gradient leaves in one flat
buffer, :class:`~soo_func.distributed.collective.Collective`) gives every rank the global
numbers: one collective per oracle call. For least squares the residuals stay sharded,
``r = (r_1; ...; r_R)``, and

    0.5 |r|^2 = sum_r 0.5 |r_r|^2,   J^T r = sum_r J_r^T r_r,   J^T J v = sum_r J_r^T (J_r v),

so the Gauss-Newton product is an all-reduced ``n``-vector (Nocedal & Wright eq. 10.23,
summed by blocks of rows). The generalized Gauss-Newton product ``J^T H_L J v`` of a
model with a loss separable over the shards reduces the same way (Martens 2010).

The oracles of :mod:`soo_func.oracles` recognise these objects
(:class:`~soo_func.oracles.ShardedFunction`) and hand them their work after charging
their counters, so every direction, search and driver runs unchanged and every rank
takes the same decisions: the optimizer state stays replicated without a broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from soo_func import oracles, tree
from soo_func.distributed.collective import Collective, DistributedOracleError
from soo_func.distributed.gather import RowGatherer, gather_rows, routes_message

PyTree = Any

__all__ = ["DataParallelObjective", "ShardedOutputs", "data_parallel", "sharded_residuals"]


def _refuse_differentiation(who: str, params: PyTree, what: str) -> None:
    """A call of a sharded objective that autograd or ``torch.func`` would differentiate
    directly would see only this rank's shard: refuse it with the supported routes."""
    traced = torch.is_grad_enabled() and any(
        t.requires_grad for t in optree.tree_leaves(params) if isinstance(t, torch.Tensor)
    )
    if tree.in_functorch_transform() or traced:
        raise DistributedOracleError(routes_message(who, what))


class DataParallelObjective(oracles.ShardedFunction):
    """A scalar ``value_fn(params, *args)`` that is this rank's shard of a sum or mean.

    A call returns the reduced value (one all-reduce); the oracles of
    :mod:`soo_func.oracles` call the methods below, one all-reduce each (a product
    operator: one per product). ``num_collectives`` counts them.
    """

    def __init__(self, value_fn: Callable[..., torch.Tensor], collective: Collective):
        if not callable(value_fn):
            raise TypeError(
                f"data_parallel: value_fn must be callable, got {type(value_fn).__name__}"
            )
        self.fn = value_fn
        self.collective = collective

    @property
    def num_collectives(self) -> int:
        return self.collective.num_collectives

    def _check(self, params: PyTree) -> None:
        self.collective.check_params(params, "data_parallel")

    def _reduce_tree(self, value: PyTree, what: str) -> PyTree:
        leaves, spec = optree.tree_flatten(value)
        return spec.unflatten(self.collective.all_reduce(leaves, what))

    def bind(self, *args: Any) -> DataParallelObjective:
        """``params -> value_fn(params, *args)`` (a batch, say) on the same collectives: the
        data-parallel form of :func:`soo_func.stochastic.training.bind_batch`."""
        fn = self.fn
        return DataParallelObjective(lambda params: fn(params, *args), self.collective)

    def __call__(self, params: PyTree, *args: Any) -> torch.Tensor:
        _refuse_differentiation("data_parallel", params, "the objective")
        self._check(params)
        value = self.fn(params, *args)
        return self.collective.all_reduce([value], "the value")[0]

    def value_and_grad(self, params: PyTree, *args: Any, has_aux: bool = False):
        """``(value, grad)`` summed over the shards in one buffer (``aux`` stays local)."""
        self._check(params)
        out, grad = oracles.value_and_grad(self.fn, has_aux=has_aux)(params, *args)
        loss = out[0] if has_aux else out
        loss, grad = self._reduce_tree((loss, grad), "the value and gradient")
        return ((loss, out[1]) if has_aux else loss), grad

    def hvp(self, params: PyTree, v: PyTree, *args: Any, mode: str = "forward-over-reverse"):
        """``H v = sum_r H_r v`` (one product per shard, one all-reduce)."""
        self._check(params)
        return self._reduce_tree(oracles.hvp(self.fn, params, v, *args, mode=mode), "H v")

    def linearization(self, params: PyTree, args: tuple) -> Callable[[PyTree], PyTree]:
        """``v -> H v`` through the shard's saved gradient graph, reduced per product."""
        self._check(params)
        local = oracles.hvp_operator(self.fn, params, *args, mode="linearize")
        return lambda v: self._reduce_tree(local(v), "H v")

    def linearize_grad(self, params: PyTree, *args: Any):
        """``(value, grad, v -> H v)``: value and gradient in one all-reduce, one per product."""
        self._check(params)
        value, grad, local = oracles.linearize_grad(self.fn, params, *args)
        value, grad = self._reduce_tree((value, grad), "the value and gradient")
        return value, grad, lambda v: self._reduce_tree(local(v), "H v")

    def ggn_product(self, params: PyTree, loss_fn: Any, *args: Any):
        raise TypeError(
            "a data_parallel value_fn is a scalar objective, not a model: build the "
            "Gauss-Newton operator from sharded_residuals(residual_fn) or sharded_model(apply_fn)"
        )


class ShardedOutputs(oracles.ShardedFunction):
    """A ``residual_fn(params, *args)`` (or a model's ``apply_fn``) whose outputs are this
    rank's rows. A Gauss-Newton product is reduced (one all-reduce per product; the rows
    stay sharded); ``objective`` is ``0.5 |r|^2`` summed over the ranks, a
    :class:`DataParallelObjective` on the same collectives. A direct call returns every
    rank's rows in rank order (one all-gather, :mod:`soo_func.distributed.gather`),
    differentiable in forward mode: the dense Jacobian (``jacfwd``) of Levenberg-Marquardt's
    dense solver and of Marquardt's ``diag(J^T J)`` is then the whole ``m x n`` Jacobian on
    every rank, gathered in one collective."""

    def __init__(self, fn: Callable[..., PyTree], collective: Collective):
        if not callable(fn):
            raise TypeError(
                f"sharded_residuals: residual_fn must be callable, got {type(fn).__name__}"
            )
        self.fn = fn
        self.collective = collective

        def half_sum_of_squares(params: PyTree, *args: Any) -> torch.Tensor:
            return 0.5 * tree.sum_of_squares(fn(params, *args))

        self.objective = DataParallelObjective(half_sum_of_squares, collective)
        self.gatherer = RowGatherer(collective)

    @property
    def num_collectives(self) -> int:
        return self.collective.num_collectives

    def bind(self, *args: Any) -> ShardedOutputs:
        """``params -> fn(params, *args)`` (a batch, the data) on the same collectives."""
        fn = self.fn
        return ShardedOutputs(lambda params: fn(params, *args), self.collective)

    def __call__(self, params: PyTree, *args: Any) -> PyTree:
        self.collective.check_params(params, "sharded_residuals")
        rows = self.fn(params, *args)
        return optree.tree_map(lambda r: gather_rows(r, self.gatherer, "sharded_residuals"), rows)

    def ggn_product(self, params: PyTree, loss_fn: Any, *args: Any):
        """``(local outputs, v -> sum_r J_r^T H_{L,r} J_r v)``."""
        self.collective.check_params(params, "sharded_residuals")
        outputs, local = oracles.ggn_operator(self.fn, params, loss_fn, *args)

        def product(v: PyTree) -> PyTree:
            leaves, spec = optree.tree_flatten(local(v))
            return spec.unflatten(self.collective.all_reduce(leaves, "J^T H_L J v"))

        return outputs, product

    def _not_scalar(self, *_: Any, **__: Any):
        raise TypeError(
            "a sharded residual_fn is not a scalar objective: use its .objective "
            "(0.5 |r|^2 summed over the ranks) as value_fn"
        )

    value_and_grad = hvp = linearization = linearize_grad = _not_scalar


def data_parallel(
    value_fn: Callable[..., torch.Tensor],
    *,
    group: Any = None,
    reduce: str = "mean",
    timeout: float | None = None,
) -> DataParallelObjective:
    """Declare ``value_fn(params, *args)`` this rank's shard of a data-parallel objective.

    ``reduce="mean"``: the objective is the mean of the ranks' values (each a mean over an
    equal-size shard); ``"sum"``: their sum (scale unequal shards' means by their share).
    ``group``: the ``torch.distributed`` group (``None``: the default); ``timeout``: seconds
    a collective may wait before :class:`DistributedOracleError` (``None``: the group's).
    Every rank must make the same calls: pass the result to ``minimize``/a chain as
    ``value_fn`` on every rank, with the same params.
    """
    return DataParallelObjective(value_fn, Collective(group, reduce, timeout))


def sharded_residuals(
    residual_fn: Callable[..., PyTree],
    *,
    group: Any = None,
    timeout: float | None = None,
    reduce: str = "sum",
) -> ShardedOutputs:
    """Declare ``residual_fn(params, *args)`` this rank's rows of a least-squares residual
    (``reduce="sum"``: loss ``0.5 |r|^2`` over all rows), or, with ``reduce="mean"``, a
    model ``apply_fn(params, inputs)`` whose per-shard loss is a mean over an equal-size
    shard (for :func:`soo_func.stochastic.training.ggn_operator`). Solve with
    ``sf.least_squares(res, params, opt, args=(shard,))``, which binds the arguments with
    ``res.bind`` and minimizes ``res.objective``; by hand the same is
    ``sf.minimize(res.objective, params, opt, extra={"residual_fn": res})``.
    """
    return ShardedOutputs(residual_fn, Collective(group, reduce, timeout))
