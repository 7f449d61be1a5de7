"""Newton-Krylov and nonlinear CG against scipy on the Moré-Garbow-Hillstrom problems.

Both sides start from MGH's standard points and are judged by the same rule: the
first iterate with ``||grad||_inf <= 1e-5`` counts as solved, and the objective
evaluations spent until then are compared (scipy's ``nfev``, soo_func's
``num_value_evals``; see ``benchmarks/bench_krylov.py``). The claims:

* ``chain(newton_krylov(), armijo())`` solves at least as many problems as scipy's
  ``trust-ncg``;
* ``chain(nonlinear_cg(beta), wolfe(c2=0.1))`` with ``beta`` Polak-Ribière or
  Hestenes-Stiefel solves at least as many as scipy's ``CG``;
* each with a median evaluation count at most 1.5x scipy's on the problems both solve.

The full set has 33 problems (about 20 s here); the subset of 8 used by the quick
benchmark is also checked, for solved counts (there the Newton evaluation count is not
claimed: see ``test_quick_subset_against_scipy``).
"""

from __future__ import annotations

import functools
import statistics

import pytest

from benchmarks import bench_krylov as bk
from benchmarks.problems import UNCONSTRAINED

OURS = {
    "newton_krylov": (bk.ours_newton, "trust-ncg"),
    "polak_ribiere": (bk.ours_cg("polak_ribiere"), "CG"),
    "hestenes_stiefel": (bk.ours_cg("hestenes_stiefel"), "CG"),
}


@functools.cache
def scipy_run(name: str, method: str) -> dict:
    return bk.run_scipy(UNCONSTRAINED[name], method)


def compare(method: str, names: tuple[str, ...]) -> tuple[int, int, list[tuple[int, int]]]:
    make, peer = OURS[method]
    ours = {name: bk.run_ours(UNCONSTRAINED[name], make) for name in names}
    theirs = {name: scipy_run(name, peer) for name in names}
    solved = sum(r["solved"] for r in ours.values())
    peer_solved = sum(r["solved"] for r in theirs.values())
    both = [
        (ours[n]["value_evals"], theirs[n]["value_evals"])
        for n in names
        if ours[n]["solved"] and theirs[n]["solved"]
    ]
    return solved, peer_solved, both


def check(method: str, names: tuple[str, ...], medians: bool = True) -> None:
    solved, peer_solved, both = compare(method, names)
    assert solved >= peer_solved, (method, solved, peer_solved)
    if not medians:
        return
    assert len(both) >= len(names) // 2
    ours_median = statistics.median(a for a, _ in both)
    peer_median = statistics.median(b for _, b in both)
    assert ours_median <= 1.5 * peer_median, (method, ours_median, peer_median)


@pytest.mark.parametrize("method", sorted(OURS))
def test_quick_subset_against_scipy(method):
    # Solved counts only: the subset is weighted to Rosenbrock-like valleys, where
    # Newton with a line search spends about 1.7x the evaluations of scipy's trust
    # region (median 45.5 against 27); the evaluation claim is made on the full set.
    check(method, bk.QUICK_PROBLEMS, medians=method != "newton_krylov")


@pytest.mark.parametrize("method", sorted(OURS))
def test_all_mgh_problems_against_scipy(method):
    check(method, tuple(UNCONSTRAINED))
