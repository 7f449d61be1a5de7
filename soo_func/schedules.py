"""Step-size schedules: ``scale_by_schedule`` and the schedules it takes.

A schedule maps the number of updates made so far (a 0-d ``int64`` tensor) to a
multiplier (a 0-d tensor or a Python number), computed on the device without a host
sync. ``scale_by_schedule(schedule)`` multiplies the updates by it. In a chain with a
line search, put it *before* the search::

    opt = sf.chain(sf.gauss_newton(damping=0.1), sf.scale_by_schedule(schedule), sf.armijo())

The search then tries ``alpha = 1`` along the shortened direction and its guarantees
(sufficient decrease, the ``next_value``/``next_grad`` it hands the driver) hold for the
step actually taken; a scaling placed after the search would move the point the search
evaluated. The mini-batch analogue of a decaying learning rate: a step that fits the
batch it was computed on (a Gauss-Newton step accepted by a search on that batch) keeps
its full length late in training, where the batch-to-batch noise it carries dominates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, guarded
from soo_func.options import check_finite, check_int_at_least, check_interval

PyTree = Any
Schedule = Callable[[torch.Tensor], "torch.Tensor | float"]

__all__ = ["ScaleByScheduleState", "cosine_decay_schedule", "scale_by_schedule"]


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the number of updates made (0-d ``int64``)."""

    count: torch.Tensor


def cosine_decay_schedule(
    init_value: float, decay_steps: int, final_fraction: float = 0.0
) -> Schedule:
    """``count -> init_value * (final_fraction + (1 - final_fraction) * c(count))`` with
    ``c(count) = (1 + cos(pi * min(count, decay_steps) / decay_steps)) / 2``.

    The cosine annealing of Loshchilov & Hutter (2017, eq. 5) without restarts: from
    ``init_value`` at ``count = 0`` down to ``final_fraction * init_value`` at
    ``decay_steps``, constant afterwards.
    """
    who = "cosine_decay_schedule"
    check_int_at_least(who, "decay_steps", decay_steps, 1)
    check_interval(who, "final_fraction", final_fraction, 0, 1, include_low=True,
                   include_high=True)  # fmt: skip
    check_finite(who, "init_value", init_value)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        progress = torch.clamp(count, max=decay_steps).to(torch.float64) / decay_steps
        cosine = 0.5 * (1 + torch.cos(math.pi * progress))
        return init_value * (final_fraction + (1 - final_fraction) * cosine)

    return schedule


def scale_by_schedule(schedule: Schedule) -> Transform:
    """Multiply the updates by ``schedule(count)``, ``count`` the number of earlier updates.

    ``schedule`` receives a 0-d ``int64`` tensor on the params' device and returns a 0-d
    tensor or a number (e.g. :func:`cosine_decay_schedule`); the multiplier is cast to
    each leaf's dtype. No host sync.
    """
    if not callable(schedule):
        raise TypeError(
            f"scale_by_schedule: schedule must be a callable count -> multiplier (e.g. "
            f"sf.cosine_decay_schedule(1.0, decay_steps)), got {type(schedule).__name__}"
        )

    def init(params: PyTree) -> ScaleByScheduleState:
        leaves = tree.leaves(params)
        device = leaves[0].device if leaves else None
        return ScaleByScheduleState(torch.zeros((), dtype=torch.int64, device=device))

    def update(updates, state: ScaleByScheduleState, params=None, **extra):
        del params, extra
        multiplier = torch.as_tensor(  # float64 so a number keeps its digits for float64 leaves
            schedule(state.count), dtype=torch.float64, device=state.count.device
        )
        scaled = tree.map_leaves(lambda u: u * multiplier.to(u.dtype), updates)
        return scaled, ScaleByScheduleState(state.count + 1)

    return guarded("scale_by_schedule", Transform(init, update), ScaleByScheduleState)
