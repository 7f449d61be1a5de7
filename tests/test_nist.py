"""The NIST StRD problems in ``benchmarks/nist.py`` are written correctly.

Independent checks of every entry: the certified residual sum of squares is reproduced
by the data and model written here (this catches a wrong digit in the data, the model or
the certified parameters), and scipy's MINPACK ``lm`` started at the certified values
does not move (the certified point is the least-squares solution of this data).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from benchmarks.nist import NIST


def _numpy_problem(problem):
    residual_fn = problem.residual_fn(torch.float64)

    def fun(b):
        return residual_fn(torch.from_numpy(b)).numpy()

    def jac(b):
        return torch.func.jacfwd(residual_fn)(torch.from_numpy(b)).numpy()

    return fun, jac


@pytest.mark.parametrize("name", sorted(NIST))
def test_certified_rss_is_reproduced(name):
    problem = NIST[name]
    r = problem.residual_fn()(problem.certified())
    rss = float((r**2).sum())
    assert rss == pytest.approx(problem.certified_rss, rel=1e-9)


@pytest.mark.parametrize("name", sorted(NIST))
def test_certified_params_are_the_least_squares_solution(name):
    problem = NIST[name]
    fun, jac = _numpy_problem(problem)
    certified = np.array(problem.certified_params)
    sol = scipy.optimize.least_squares(
        fun, certified, jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
    )
    np.testing.assert_allclose(sol.x, certified, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(NIST))
def test_shapes_and_starts(name):
    problem = NIST[name]
    assert len(problem.x) == len(problem.y) == problem.m
    start1, start2 = problem.starts(torch.float32)
    assert start1.shape == start2.shape == (problem.n,)
    assert start1.dtype == torch.float32
    assert problem.residual_fn(torch.float32)(start1).shape == (problem.m,)
    assert not torch.equal(start1, start2)
