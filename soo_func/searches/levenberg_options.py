"""The options of :func:`~soo_func.searches.levenberg` and
:func:`~soo_func.searches.levenberg_marquardt`, named and checked in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from soo_func.options import (
    check_in,
    check_int_at_least,
    check_interval,
    check_nonnegative,
    check_positive,
)

__all__ = ["DAMPING_RULES", "MODES", "SOLVERS", "LevenbergOptions"]

DAMPING_RULES = ("nielsen", "multiply", "more", "auto")
SOLVERS = ("auto", "dense", "cg")
MODES = ("dense", "dense_chunked", "matrix_free")
"""The solver an update used, by its code in ``LevenbergState.mode`` (-1: no update yet):
the Jacobian in one ``vmap``, the Jacobian in chunks, or matrix-free CG."""


@dataclass(frozen=True)
class LevenbergOptions:
    """The hyper-parameters of a Levenberg(-Marquardt) transform; the meaning of each is
    in :func:`~soo_func.searches.levenberg`'s docstring. Defaults are Levenberg's
    (``levenberg_marquardt`` uses ``damping_rule="auto"`` and ``dense_max_params=None``)."""

    tau: float = 1e-3
    initial_damping: float | None = None
    accept_ratio: float = 1e-4
    damping_rule: str = "nielsen"
    increase_factor: float = 10.0
    decrease_factor: float = 10.0
    min_damping: float = 1e-20
    max_damping: float = 1e20
    solver: str = "auto"
    dense_max_params: int | None = 200
    cg_rtol: float = 1e-6
    step_rtol: float = 1e-14
    max_jacobian_bytes: int | None = None
    chunk_size: int | None = None

    def check(self, who: str) -> None:
        """Raise ``ValueError`` naming ``who`` and the first bad option."""
        self._check_damping(who)
        check_interval(who, "accept_ratio", self.accept_ratio, 0, 1, include_low=True)
        check_in(who, "solver", self.solver, SOLVERS)
        for name in ("dense_max_params", "max_jacobian_bytes", "chunk_size"):
            if getattr(self, name) is not None:
                check_int_at_least(who, f"{name} (or None)", getattr(self, name), 1)
        check_interval(who, "cg_rtol", self.cg_rtol, 0, 1)
        check_nonnegative(who, "step_rtol", self.step_rtol)

    def _check_damping(self, who: str) -> None:
        check_positive(who, "tau (typical 1e-6 to 1)", self.tau)
        if self.initial_damping is not None:
            check_positive(who, "initial_damping (or None)", self.initial_damping)
        check_in(who, "damping_rule", self.damping_rule, DAMPING_RULES)
        check_interval(who, "increase_factor", self.increase_factor, 1, math.inf)
        check_interval(who, "decrease_factor", self.decrease_factor, 1, math.inf)
        check_positive(who, "min_damping", self.min_damping)
        check_positive(who, "max_damping", self.max_damping)
        if not self.min_damping < self.max_damping:
            raise ValueError(
                f"{who}: need 0 < min_damping < max_damping, got {self.min_damping} and "
                f"{self.max_damping}"
            )
