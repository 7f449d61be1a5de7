"""Data-parallel solves on ``torch.distributed``: the same trajectory on N ranks as on one.

* :func:`data_parallel` -- a scalar ``value_fn`` that is this rank's shard of a sum or mean.
* :func:`sharded_residuals` -- a ``residual_fn`` (or a model) whose outputs are this rank's rows.
* :class:`DistributedOracleError` -- a failed collective or mismatched shards.
* :func:`run_local` -- a function on N spawned local ranks, with a deadline.

Every oracle of :mod:`soo_func.oracles` reduces a sharded function's results across the
group in one all-reduce per call (:mod:`soo_func.distributed.objectives`).
"""

from soo_func.distributed.collective import Collective, DistributedOracleError
from soo_func.distributed.launch import free_port, run_local
from soo_func.distributed.objectives import (
    DataParallelObjective,
    ShardedOutputs,
    data_parallel,
    sharded_residuals,
)

__all__ = [
    "Collective",
    "DataParallelObjective",
    "DistributedOracleError",
    "ShardedOutputs",
    "data_parallel",
    "free_port",
    "run_local",
    "sharded_residuals",
]
