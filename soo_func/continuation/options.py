"""The checked options of the two path followers (:class:`MinimizerPathOptions`,
:class:`ArclengthOptions`): a clear ``ValueError`` naming the follower and the option
for a value out of range."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

from soo_func.continuation.family import Family
from soo_func.options import check_in, check_int_at_least, check_nonnegative, check_positive

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
        check_positive(who, name, value)


def _check_counts(who: str, counts: dict[str, int | None]) -> None:
    """Integers >= 1 (``None``: the documented default)."""
    for name, value in counts.items():
        if value is not None:
            check_int_at_least(who, name, value, 1)


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
        shrink=o.shrink, final_gap=o.final_gap, tangent_rtol=o.tangent_rtol,
    )  # fmt: skip
    check_nonnegative("homotopy", "corrector_atol", o.corrector_atol)
    if o.corrector_atol == 0:
        numbers["corrector_rtol"] = o.corrector_rtol
    else:
        check_nonnegative("homotopy", "corrector_rtol", o.corrector_rtol)
    if o.anchor_curvature is not None:
        numbers["anchor_curvature"] = o.anchor_curvature
    _check_positive("homotopy", numbers)
    _check_counts("homotopy", dict(
        fast_steps=o.fast_steps, max_corrector_steps=o.max_corrector_steps,
        tangent_max_iters=o.tangent_max_iters,
    ))  # fmt: skip
    if o.grow < 1:
        raise ValueError(f"homotopy: grow must be >= 1, got {o.grow}")
    if not o.shrink < 1:
        raise ValueError(f"homotopy: shrink must be in (0, 1), got {o.shrink}")
    check_in("homotopy", "predictor", o.predictor, ("tangent", "none"))


def check_arclength_options(options: ArclengthOptions) -> None:
    """Range checks of the arclength follower's options."""
    o, who = options, "arclength_homotopy"
    _check_positive(who, dict(
        initial_arclength=o.initial_arclength, max_step=o.max_step, min_step=o.min_step,
        corrector_tol=o.corrector_tol, krylov_rtol=o.krylov_rtol, descent_gtol=o.descent_gtol,
    ))  # fmt: skip
    check_in(who, "solver", o.solver, ("auto", "dense", "minres"))
    if not o.min_step <= o.initial_arclength <= o.max_step:
        raise ValueError(f"{who}: need min_step <= initial_arclength <= max_step")
    _check_counts(who, dict(
        max_path_steps=o.max_path_steps, max_minimizers=o.max_minimizers,
        max_corrector_iters=o.max_corrector_iters, max_descent_steps=o.max_descent_steps,
        krylov_max_iters=o.krylov_max_iters,
    ))  # fmt: skip
