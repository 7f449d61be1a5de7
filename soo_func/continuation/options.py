"""The checked options of the two path followers (:class:`MinimizerPathOptions`,
:class:`ArclengthOptions`): a clear ``ValueError`` naming the follower and the option
for a value out of range."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

from soo_func.continuation.family import Family

__all__ = [
    "ArclengthOptions",
    "MinimizerPathOptions",
    "check_arclength_options",
    "check_minimizer_path_options",
    "fixed_schedule",
]


class MinimizerPathOptions(NamedTuple):
    """The options of :func:`~soo_func.continuation.minimizer_homotopy` (``fixed``: the
    ``t`` values of a fixed schedule, ``None`` for ``"linear"``/``"exponential"``)."""

    family: Family
    fixed: tuple[float, ...] | None
    exponential: bool
    stage_step: float
    max_step: float
    min_step: float
    grow: float
    shrink: float
    fast_steps: int
    max_corrector_steps: int
    corrector_rtol: float
    corrector_atol: float
    shrink_tolerance: bool
    retry_last_stage: bool
    final_gap: float
    anchor_curvature: float | None
    predictor: str
    tangent_rtol: float
    tangent_max_iters: int | None


class ArclengthOptions(NamedTuple):
    """The options of :func:`~soo_func.continuation.arclength_homotopy`."""

    family: Family
    initial_arclength: float
    max_step: float
    min_step: float
    max_path_steps: int
    max_minimizers: int
    descend_first: bool
    descent_gtol: float
    max_descent_steps: int
    max_corrector_iters: int
    corrector_tol: float
    krylov_rtol: float
    krylov_max_iters: int | None
    solver: str


def _check_positive(who: str, numbers: dict[str, float]) -> None:
    for name, value in numbers.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{who}: {name} must be a positive finite number, got {value!r}")


def fixed_schedule(schedule: str | Sequence[float]) -> tuple[float, ...] | None:
    """The ``t`` values of a fixed schedule (checked); ``None`` for a named one."""
    if isinstance(schedule, str):
        if schedule not in ("linear", "exponential"):
            raise ValueError(
                f"homotopy: schedule must be 'linear', 'exponential' or an increasing sequence "
                f"of t values ending at 1, got {schedule!r}"
            )
        return None
    points = [float(s) for s in schedule]
    if not points or points[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(points)):
        raise ValueError(
            f"homotopy: a fixed schedule must be strictly increasing and end at 1.0, got {points}"
        )
    if points[0] < 0:
        raise ValueError(f"homotopy: schedule values must lie in [0, 1], got {points}")
    return tuple(points)


def check_minimizer_path_options(options: MinimizerPathOptions) -> None:
    """Range checks (the family and the schedule are checked when they are built)."""
    o = options
    numbers = dict(
        stage_step=o.stage_step, max_step=o.max_step, min_step=o.min_step, grow=o.grow,
        shrink=o.shrink, fast_steps=o.fast_steps, max_corrector_steps=o.max_corrector_steps,
        final_gap=o.final_gap, tangent_rtol=o.tangent_rtol,
    )  # fmt: skip
    if o.corrector_atol == 0:
        numbers["corrector_rtol"] = o.corrector_rtol
    if o.anchor_curvature is not None:
        numbers["anchor_curvature"] = o.anchor_curvature
    _check_positive("homotopy", numbers)
    if o.grow < 1:
        raise ValueError(f"homotopy: grow must be >= 1, got {o.grow}")
    if not o.shrink < 1:
        raise ValueError(f"homotopy: shrink must be in (0, 1), got {o.shrink}")
    if o.corrector_atol < 0 or o.corrector_rtol < 0:
        raise ValueError("homotopy: corrector_rtol and corrector_atol must be >= 0")
    if o.predictor not in ("tangent", "none"):
        raise ValueError(f"homotopy: predictor must be 'tangent' or 'none', got {o.predictor!r}")


def check_arclength_options(options: ArclengthOptions) -> None:
    """Range checks of the arclength follower's options."""
    o, who = options, "arclength_homotopy"
    _check_positive(who, dict(
        initial_arclength=o.initial_arclength, max_step=o.max_step, min_step=o.min_step,
        corrector_tol=o.corrector_tol, krylov_rtol=o.krylov_rtol, descent_gtol=o.descent_gtol,
    ))  # fmt: skip
    if o.solver not in ("auto", "dense", "minres"):
        raise ValueError(f"{who}: solver must be 'auto', 'dense' or 'minres', got {o.solver!r}")
    if not o.min_step <= o.initial_arclength <= o.max_step:
        raise ValueError(f"{who}: need min_step <= initial_arclength <= max_step")
    counts = dict(
        max_path_steps=o.max_path_steps, max_minimizers=o.max_minimizers,
        max_corrector_iters=o.max_corrector_iters, max_descent_steps=o.max_descent_steps,
    )  # fmt: skip
    for name, value in counts.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}")
