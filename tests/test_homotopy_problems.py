"""Homotopy-wrapped Newton against plain Newton from far starting points (10x the
standard Moré-Garbow-Hillstrom starts): on this quick subset the homotopy solves every
problem that plain Newton solves, and more. The full comparison (10x and 100x, all
problems) is the ``homotopy_far_starts`` suite of ``benchmarks/bench_homotopy.py``."""

from __future__ import annotations

import pytest

import soo_func as sf
from benchmarks.bench_homotopy import run_far_start
from benchmarks.problems import UNCONSTRAINED

SUBSET = ("helical_valley", "powell_singular", "gaussian", "brown_dennis")


@pytest.fixture(scope="module")
def outcomes():
    return {
        (name, homotopy): run_far_start(name, 10.0, homotopy, max_steps=150, gtol=1e-6)
        for name in SUBSET
        for homotopy in (False, True)
    }


def test_homotopy_solves_none_fewer_than_newton(outcomes):
    newton = {name for name in SUBSET if outcomes[(name, False)]["solved"]}
    homotopy = {name for name in SUBSET if outcomes[(name, True)]["solved"]}
    assert newton <= homotopy, f"homotopy lost {sorted(newton - homotopy)}"
    assert len(homotopy) > len(newton), "the subset should show the homotopy's advantage"


def test_the_history_reports_the_path():
    problem = UNCONSTRAINED["gaussian"]
    opt = sf.chain(sf.homotopy(), sf.newton_krylov(), sf.armijo())
    result = sf.minimize(problem.fn, 10 * problem.x0, opt, gtol=1e-6, max_steps=150)
    rows = result.history[1:]
    ts = [row["continuation_t"] for row in rows]
    stages = [row["continuation_stage"] for row in rows]
    assert result.converged and ts[-1] == 1.0 and ts == sorted(ts) and stages == sorted(stages)
    assert stages[-1] >= 3  # several stages, each with its t, value and gradient norm
    assert all(row["converged_ok"] == (row["continuation_t"] == 1.0) for row in rows)
