"""Box bounds ``lower <= params <= upper`` on pytrees: building, projecting, reporting.

A bound is ``None`` (no bound), a number (the same bound on every entry) or a pytree like
the params whose leaves broadcast to the params' leaves; ``-inf`` / ``+inf`` entries are
absent bounds. :func:`flat_box` turns them into two flat vectors on the params' raveled
layout (:func:`soo_func.tree.ravel`), which is what the bounded methods work on.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from soo_func import tree

PyTree = Any

__all__ = [
    "Box",
    "active_bounds",
    "bounded_publish",
    "flat_box",
    "project_to_bounds",
    "projected_gradient_norm",
]


class Box(NamedTuple):
    """Flat ``lower`` and ``upper`` vectors (``-inf`` / ``+inf`` where unbounded)."""

    lower: torch.Tensor
    upper: torch.Tensor

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the box: ``min(max(x, lower), upper)``."""
        return torch.minimum(torch.maximum(x, self.lower), self.upper)


def _flat_bound(bound: Any, params: PyTree, fill: float, name: str) -> torch.Tensor:
    like = tree.leaves(params)
    ref = like[0]
    if bound is None or isinstance(bound, (int, float)):
        value = fill if bound is None else float(bound)
        if math.isnan(value):
            raise ValueError(f"{name} must not be NaN (use {fill} for no bound)")
        return torch.full((sum(leaf.numel() for leaf in like),), value, dtype=ref.dtype,
                          device=ref.device)  # fmt: skip
    tree.check_same_structure(params, bound, names=("params", name))
    parts = []
    for leaf, b in zip(like, tree.leaves(bound), strict=True):
        b = torch.as_tensor(b, dtype=leaf.dtype, device=leaf.device)
        try:
            parts.append(torch.broadcast_to(b, leaf.shape).reshape(-1))
        except RuntimeError as err:
            raise ValueError(
                f"{name}: a leaf of shape {tuple(b.shape)} does not broadcast to the params' "
                f"leaf of shape {tuple(leaf.shape)}"
            ) from err
    flat = torch.cat(parts) if parts else ref.new_zeros(0)
    if bool(torch.isnan(flat).any()):
        raise ValueError(f"{name} must not hold NaN (use {fill} for no bound)")
    return flat


def flat_box(lower: Any, upper: Any, params: PyTree) -> Box:
    """The :class:`Box` of ``lower`` / ``upper`` on the raveled ``params``; raises when a
    lower bound exceeds its upper bound."""
    box = Box(_flat_bound(lower, params, -math.inf, "lower"),
              _flat_bound(upper, params, math.inf, "upper"))  # fmt: skip
    crossed = box.lower > box.upper
    if bool(crossed.any()):
        first = int(torch.nonzero(crossed)[0])
        raise ValueError(
            f"lower > upper at flat entry {first} ({float(box.lower[first])} > "
            f"{float(box.upper[first])}): every lower bound must be at most its upper bound"
        )
    return box


def project_to_bounds(params: PyTree, lower: Any = None, upper: Any = None) -> PyTree:
    """``params`` moved to the nearest point of the box (a feasible start)."""
    box = flat_box(lower, upper, params)
    return tree.unravel(box.project(tree.ravel(params).flat), params)


def active_bounds(params: PyTree, lower: Any = None, upper: Any = None) -> PyTree:
    """A pytree like ``params`` of int8: ``-1`` where an entry is at its lower bound, ``+1``
    at its upper bound, ``0`` free (a fixed entry, ``lower == upper``, reads ``-1``)."""
    box = flat_box(lower, upper, params)
    x = tree.ravel(params).flat
    at_lower, at_upper = x <= box.lower, x >= box.upper
    code = torch.where(at_lower, -1, torch.where(at_upper, 1, 0)).to(torch.int8)
    shaped = tree.map_leaves(lambda leaf: leaf.to(torch.int8), params)
    return tree.unravel(code, shaped)


def projected_gradient_norm(x: torch.Tensor, g: torch.Tensor, box: Box) -> torch.Tensor:
    """``||P(x - g) - x||_inf``, 0-d: the first-order stationarity measure of a box-bounded
    problem (L-BFGS-B's ``pgtol`` test, Byrd, Lu, Nocedal & Zhu 1995 section 6)."""
    if x.numel() == 0:
        return x.new_zeros(())
    return (box.project(x - g) - x).abs().amax()


def bounded_publish(state: Any, value_fn: Any) -> dict[str, Any]:
    """The keys every bounded whole optimizer publishes, read off its ``state``: the accepted
    point's ``next_value`` / ``next_grad`` (reused by the driver with ``next_value_fn``),
    ``search_failed``, ``num_active_bounds`` and ``projected_grad_inf`` (the driver's
    ``gtol`` test on a box)."""
    return {
        "next_value": state.next_value,
        "next_grad": state.next_grad,
        "next_value_fn": value_fn,
        "search_failed": state.search_failed,
        "num_active_bounds": state.num_active_bounds,
        "projected_grad_inf": state.projected_grad_inf,
    }
