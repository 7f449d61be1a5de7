"""The driver :func:`least_squares`: :func:`~soo_func.drivers.minimize.minimize` on
``0.5 * ||r(params)||^2`` with ``residual_fn`` passed to the optimizer as an extra."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree
from soo_func.base import Transform
from soo_func.drivers.minimize import MinimizeResult, minimize
from soo_func.searches.levenberg import levenberg_marquardt

PyTree = Any

__all__ = ["least_squares"]


def least_squares(
    residual_fn: Callable[[PyTree], PyTree],
    params: PyTree,
    optimizer: Transform | None = None,
    **kwargs: Any,
) -> MinimizeResult:
    """Minimize ``0.5 * ||residual_fn(params)||^2``.

    The optimizer receives ``residual_fn`` as an extra (Gauss-Newton and
    Levenberg-Marquardt use it). When ``optimizer`` is ``None`` it is
    ``levenberg_marquardt()``. Other keyword arguments go to :func:`minimize`.
    """
    if optimizer is None:
        optimizer = levenberg_marquardt()

    def value_fn(p: PyTree) -> torch.Tensor:
        r = residual_fn(p)
        return 0.5 * tree.sum_of_squares(r)

    extra = dict(kwargs.pop("extra", None) or {}, residual_fn=residual_fn)
    return minimize(value_fn, params, optimizer, extra=extra, **kwargs)
