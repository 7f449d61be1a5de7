"""Drivers: the host-side loops that evaluate, update and stop (:func:`minimize`,
:func:`least_squares`, and the sync-free loop that ``vmap`` batches:
:func:`batched_minimize`, :func:`batched_least_squares`). Nothing below the drivers imports them."""

from soo_func.drivers.batched import batched_least_squares, batched_minimize
from soo_func.drivers.continuation import PathResult, continuation_path
from soo_func.drivers.least_squares import least_squares
from soo_func.drivers.minimize import MinimizeResult, minimize

__all__ = [
    "MinimizeResult",
    "PathResult",
    "batched_least_squares",
    "batched_minimize",
    "continuation_path",
    "least_squares",
    "minimize",
]
