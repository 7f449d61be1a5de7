"""What a step's publication hands the driver: the value and gradient at the new point
when the optimizer has already evaluated them (shared by the host and sync-free loops)."""

from __future__ import annotations

from typing import Any

from soo_func.oracles import CountedObjective

PyTree = Any

__all__ = ["reusable"]


def reusable(published: dict[str, Any], objective: CountedObjective, new_params: PyTree):
    """``(value, grad)`` of ``objective`` at ``new_params`` from what a search published.

    Either the search evaluated the driver's own objective there (``next_value_fn is
    objective``), or it evaluated a rewritten objective (``next_value_fn`` is the
    published ``value_fn``) and ``recover_objective(value, grad, params)`` maps its value
    and gradient there to the driver's (a homotopy's ``f = f_t + (1 - t) <g0, x>``).
    ``None`` when the driver must evaluate the point itself.
    """
    next_fn, next_grad = published.get("next_value_fn"), published.get("next_grad")
    if next_fn is None or next_grad is None:
        return None
    if next_fn is objective:
        return published["next_value"], next_grad
    recover = published.get("recover_objective")
    if recover is not None and next_fn is published.get("value_fn"):
        return recover(published["next_value"], next_grad, new_params)
    return None
