"""Fault injection (issue 16): every method family with its natural search, run through the
drivers on a nonlinear least-squares problem with a fault injected, must give back its last
good point (finite params, a value at most the start's) and a state that a later run can
continue from.

Faults: NaN and inf at trial points (beyond the minimizer, where the full Newton-type steps land), NaN everywhere but the
start, an exception and ``KeyboardInterrupt`` in the objective at a given call, objective
scales of 1e-30 and 1e30, and a zero-size leaf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import soo_func as sf
from soo_func import tree

D = torch.float64
START = {"w": torch.tensor([-1.0, -0.5, 0.0], dtype=D)}
WITH_EMPTY = {**START, "e": torch.zeros(0, dtype=D)}  # a zero-size leaf


def residuals(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``atan(w - 1)``, zero at w = 1: from START the Gauss-Newton / Newton steps overshoot
    far beyond the minimizer (to w = 4.5 for the first coordinate)."""
    return {"r": torch.atan(p["w"] - 1), **({"e": p["e"]} if "e" in p else {})}


# The families: (name, optimizer factory, whether it runs through least_squares).
FAMILIES: dict[str, tuple[Callable[[], sf.Transform], bool]] = {
    "lbfgs+wolfe": (lambda: sf.chain(sf.lbfgs(), sf.wolfe()), False),
    "bfgs+armijo": (lambda: sf.chain(sf.bfgs(), sf.armijo()), False),
    "ssbroyden+wolfe": (lambda: sf.chain(sf.ssbroyden(), sf.wolfe()), False),
    "ssbfgs(m)+wolfe": (lambda: sf.chain(sf.ssbfgs(memory_size=3), sf.wolfe()), False),
    "nonlinear_cg+wolfe": (lambda: sf.chain(sf.nonlinear_cg(), sf.wolfe(c2=0.1)), False),
    "newton_krylov+trust_region": (
        lambda: sf.chain(sf.newton_krylov(), sf.trust_region()),
        False,
    ),
    "gauss_newton+armijo": (lambda: sf.chain(sf.gauss_newton(), sf.armijo()), True),
    "levenberg_marquardt": (lambda: sf.levenberg_marquardt(), True),
}


def run(family: str, residual_fn: Callable, scale: float = 1.0, **kwargs: Any) -> sf.MinimizeResult:
    """The family's driver on ``scale * 0.5 |r|^2`` (``sqrt(scale) r`` for least squares)."""
    make, is_least_squares = FAMILIES[family]
    params = kwargs.pop("params", START)
    if is_least_squares:
        root = math.sqrt(scale)
        scaled = residual_fn if scale == 1.0 else (lambda p: tree.scale(root, residual_fn(p)))
        return sf.least_squares(scaled, params, make(), **kwargs)
    return sf.minimize(
        lambda p: scale * 0.5 * tree.sum_of_squares(residual_fn(p)), params, make(), **kwargs
    )


def start_value(scale: float = 1.0) -> float:
    return scale * 0.5 * float(tree.sum_of_squares(residuals(START)))


def poisoned(bad: Callable[[dict], torch.Tensor], poison: float) -> Callable:
    """``residuals`` with every entry ``poison`` where ``bad(params)``."""

    def fn(p):
        out = residuals(p)
        return tree.map_leaves(lambda r: torch.where(bad(p), torch.full_like(r, poison), r), out)

    return fn


def beyond_minimizer(p):
    return (p["w"] > 1.5).any()


def not_the_start(p):
    return (p["w"] != START["w"]).any()


def raising(error: BaseException, at_call: int) -> Callable:
    calls = [0]

    def fn(p):
        calls[0] += 1
        if calls[0] == at_call:
            raise error
        return residuals(p)

    return fn


def assert_last_good_point(result: sf.MinimizeResult, scale: float = 1.0) -> None:
    assert all(bool(torch.isfinite(leaf).all()) for leaf in tree.leaves(result.params))
    assert math.isfinite(float(result.value))
    assert float(result.value) <= start_value(scale)
    assert result.params.get("e", torch.zeros(0)).shape == (0,)


def assert_state_continues(family: str, result: sf.MinimizeResult, scale: float = 1.0) -> None:
    """A later run on the clean objective continues from the returned params and state."""
    later = run(family, residuals, scale, params=result.params, state=result.state, max_steps=3)
    assert_last_good_point(later, scale)
    assert float(later.value) <= float(result.value)
    assert not later.reason.startswith("interrupted")


FAULTS = ["nan_trials", "inf_trials", "nan_but_start", "tiny_scale", "huge_scale", "zero_leaf"]


def faulty_run(family: str, fault: str) -> tuple[sf.MinimizeResult, float]:
    if fault in ("nan_trials", "inf_trials"):
        poison = math.nan if fault == "nan_trials" else math.inf
        return run(family, poisoned(beyond_minimizer, poison), max_steps=200, gtol=1e-8), 1.0
    if fault == "nan_but_start":
        return run(family, poisoned(not_the_start, math.nan), max_steps=200), 1.0
    if fault in ("tiny_scale", "huge_scale"):
        scale = 1e-30 if fault == "tiny_scale" else 1e30
        return run(family, residuals, scale, max_steps=200, gtol=0.0, gtol_rel=1e-8), scale
    return run(family, residuals, params=WITH_EMPTY, max_steps=200, gtol=1e-8), 1.0


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fault_gives_back_the_last_good_point(family, fault):
    result, scale = faulty_run(family, fault)
    assert_last_good_point(result, scale)
    assert result.num_steps < 200 or fault == "nan_but_start", result.reason
    if fault == "nan_but_start":
        assert torch.equal(result.params["w"], START["w"]) and not result.converged
    if fault in ("inf_trials", "nan_trials", "zero_leaf"):
        assert result.converged, result.reason
        torch.testing.assert_close(result.params["w"], torch.ones(3, dtype=D), atol=1e-6, rtol=0)
    assert_state_continues(family, result, scale)


@pytest.mark.parametrize("at_call", [2, 4, 6])
@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl_c"]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_exception_in_the_objective_keeps_the_run(family, error, at_call):
    with pytest.raises(type(error)) as caught:
        run(family, raising(error, at_call), max_steps=200, gtol=1e-8)
    partial = caught.value.partial_result
    assert partial.reason == f"interrupted: {type(error).__name__}" and not partial.converged
    assert len(partial.history) == partial.num_steps + 1
    assert_last_good_point(partial)
    assert float(partial.value) == pytest.approx(start_value_at(partial.params), rel=1e-15)
    assert_state_continues(family, partial)


def start_value_at(params) -> float:
    return 0.5 * float(tree.sum_of_squares(residuals(params)))


@pytest.mark.parametrize("solver", ["cr", "cg", "minres"])
@pytest.mark.parametrize("search", ["armijo", "wolfe", "trust_region"])
def test_newton_krylov_solves_a_float32_quadratic_scaled_by_1e25(solver, search):
    """``1e25 |x - 1|^2`` in float32: the gradient (2e25) and the Hessian (2e25 I) are
    finite but their squares are not. The Krylov solve must still return the Newton step
    (CR's ``|A p|^2`` used to overflow to a zero step, and Steihaug's ``|g|^2`` to an
    infinite tolerance, and the search then failed at the start); the run reaches
    ``x = 1`` in at most two steps."""
    result = sf.minimize(
        lambda p: 1e25 * ((p["x"] - 1) ** 2).sum(),
        {"x": torch.zeros(3)},
        sf.chain(sf.newton_krylov(solver=solver), getattr(sf, search)()),
    )
    assert result.converged, result.reason
    assert result.num_steps <= 2
    assert torch.equal(result.params["x"], torch.ones(3))
