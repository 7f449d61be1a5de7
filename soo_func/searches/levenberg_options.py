"""The options of :func:`~soo_func.searches.levenberg` and
:func:`~soo_func.searches.levenberg_marquardt`, named and checked in one place."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DAMPING_RULES", "SOLVERS", "LevenbergOptions"]

DAMPING_RULES = ("nielsen", "multiply", "more", "auto")
SOLVERS = ("auto", "dense", "cg")


@dataclass(frozen=True)
class LevenbergOptions:
    """The hyper-parameters of a Levenberg(-Marquardt) transform; the meaning of each is
    in :func:`~soo_func.searches.levenberg`'s docstring. Defaults are Levenberg's
    (``levenberg_marquardt`` uses ``damping_rule="auto"``)."""

    tau: float = 1e-3
    initial_damping: float | None = None
    accept_ratio: float = 1e-4
    damping_rule: str = "nielsen"
    increase_factor: float = 10.0
    decrease_factor: float = 10.0
    min_damping: float = 1e-20
    max_damping: float = 1e20
    solver: str = "auto"
    dense_max_params: int = 200
    cg_rtol: float = 1e-6
    step_rtol: float = 1e-14

    def check(self, who: str) -> None:
        """Raise ``ValueError`` naming ``who`` and the first bad option."""
        self._check_damping(who)
        if not 0 <= self.accept_ratio < 1:
            raise ValueError(f"{who}: accept_ratio must be in [0, 1), got {self.accept_ratio}")
        if self.solver not in SOLVERS:
            raise ValueError(f"{who}: solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.dense_max_params < 1:
            raise ValueError(
                f"{who}: dense_max_params must be at least 1, got {self.dense_max_params}"
            )
        if not 0 < self.cg_rtol < 1:
            raise ValueError(f"{who}: cg_rtol must be in (0, 1), got {self.cg_rtol}")
        if self.step_rtol < 0:
            raise ValueError(f"{who}: step_rtol must be non-negative, got {self.step_rtol}")

    def _check_damping(self, who: str) -> None:
        if self.tau <= 0:
            raise ValueError(f"{who}: tau must be positive (typical 1e-6 to 1), got {self.tau}")
        if self.initial_damping is not None and self.initial_damping <= 0:
            raise ValueError(
                f"{who}: initial_damping must be positive or None, got {self.initial_damping}"
            )
        if self.damping_rule not in DAMPING_RULES:
            raise ValueError(
                f"{who}: damping_rule must be one of {DAMPING_RULES}, got {self.damping_rule!r}"
            )
        if self.increase_factor <= 1 or self.decrease_factor <= 1:
            raise ValueError(
                f"{who}: increase_factor and decrease_factor must exceed 1, got "
                f"{self.increase_factor} and {self.decrease_factor}"
            )
        if not 0 < self.min_damping < self.max_damping:
            raise ValueError(
                f"{who}: need 0 < min_damping < max_damping, got {self.min_damping} and "
                f"{self.max_damping}"
            )
