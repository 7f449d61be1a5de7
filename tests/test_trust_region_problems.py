"""Trust regions after Newton-Krylov, BFGS and SR1 (as users write them: ``sr1()``) on the
Moré-Garbow-Hillstrom set:
each solves at least 90% of what its scipy peer solves (``trust-ncg``, ``BFGS``,
``trust-constr``) from the standard starting points."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED, scipy_funcs

directions = pytest.importorskip("soo_func.directions")

PEERS = {
    "newton_krylov": ("trust-ncg", lambda: directions.newton_krylov(solver="cg")),
    "bfgs": ("BFGS", lambda: directions.bfgs()),
    "sr1": ("trust-constr", lambda: directions.sr1()),
}


def _solved(value: float, f_opt: float | None, best: float) -> bool:
    target = best if f_opt is None else f_opt
    return value <= target + 1e-6 + 1e-4 * abs(target)


def _cached_hessp(funcs):
    """``hessp(x, p) = H(x) p`` with the dense Hessian formed once per ``x`` (n <= 12 here):
    the same products as ``funcs.hessp``, without one autograd call per CG iteration."""
    cache = {}

    def hessp(x, p):
        key = np.asarray(x, dtype=np.float64).tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = funcs.hess(x)
        return cache[key] @ p

    return hessp


def _scipy(method: str, problem):
    funcs = scipy_funcs(problem)
    kwargs = {"jac": funcs.jac}
    if method == "trust-ncg":
        kwargs["hessp"] = _cached_hessp(funcs)
    if method == "trust-constr":
        kwargs["hess"] = scipy.optimize.SR1()
    with np.errstate(all="ignore"):
        result = scipy.optimize.minimize(
            funcs.fun, problem.x0.numpy(), method=method, options={"maxiter": 1000}, **kwargs
        )
    return float(result.fun)


@pytest.mark.parametrize("direction", ["bfgs", "newton_krylov", "sr1"])
def test_solves_ninety_percent_of_what_scipy_solves(direction):
    method, make = PEERS[direction]
    ours_solved, peer_solved = set(), set()
    for name, problem in UNCONSTRAINED.items():
        peer = _scipy(method, problem)
        opt = sf.chain(make(), sf.trust_region())
        result = sf.minimize(problem.fn, problem.x0.clone(), opt, max_steps=1000, gtol=1e-6)
        ours = float(result.value) if torch.isfinite(result.value) else np.inf
        best = min(peer, ours)
        if _solved(peer, problem.f_opt, best):
            peer_solved.add(name)
        if _solved(ours, problem.f_opt, best):
            ours_solved.add(name)
    assert len(ours_solved & peer_solved) >= 0.9 * len(peer_solved), sorted(
        peer_solved - ours_solved
    )
