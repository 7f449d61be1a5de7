"""Direction memories across a homotopy's stage changes: :func:`reset_at_stage_change`."""

from __future__ import annotations

import optree
import torch

from soo_func.base import Transform, check_state

__all__ = ["reset_at_stage_change"]


def reset_at_stage_change(direction: Transform) -> Transform:
    """Wrap ``direction`` so that its state restarts when a homotopy changes the objective.

    A quasi-Newton memory holds pairs ``(s, y)`` of one objective; across a stage change
    of :func:`~soo_func.continuation.homotopy` (a new ``t``, and a predictor jump that the
    direction does not see as a step) its newest pair mixes two objectives and two
    points. The wrapper reads the ``continuation_restart`` flag that the homotopy
    publishes (true on the update that starts a stage and on the one after it) and
    replaces the state by ``direction.init(params)`` there, with ``torch.where`` (no
    host sync). Use it as ``chain(homotopy("convex"), reset_at_stage_change(lbfgs()), wolfe())``
    (the arclength follower publishes the flag too: true whenever it moved the point).
    """

    def update(updates, state, params=None, **extra):
        restart = extra.get("continuation_restart")
        if restart is not None:
            if params is None:
                raise TypeError("reset_at_stage_change needs params to re-initialize the state")
            fresh = direction.init(params)
            check_state("reset_at_stage_change's direction", state, type(fresh))
            state = optree.tree_map(lambda new, old: torch.where(restart, new, old), fresh, state)
        return direction.update(updates, state, params, **extra)

    return Transform(direction.init, update, direction.publish)
