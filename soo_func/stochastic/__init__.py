"""Stochastic (mini-batch) second-order methods: Hessian-free and multi-batch L-BFGS.

The batch-level helpers (:func:`~soo_func.stochastic.training.bind_batch`, subsampled
curvature operators, :func:`~soo_func.stochastic.training.training_step`) live in
:mod:`soo_func.stochastic.training`.
"""

from soo_func.stochastic import training
from soo_func.stochastic.hessian_free import HessianFreeState, hessian_free
from soo_func.stochastic.multi_batch_lbfgs import (
    MultiBatchLBFGSState,
    batch_overlap,
    multi_batch_lbfgs,
    overlapping_batches,
)

__all__ = [
    "HessianFreeState",
    "MultiBatchLBFGSState",
    "batch_overlap",
    "hessian_free",
    "multi_batch_lbfgs",
    "overlapping_batches",
    "training",
]
