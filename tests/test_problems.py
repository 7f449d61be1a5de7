"""The Moré-Garbow-Hillstrom problems: values at x0 and at minimizers, gradients, and f_opt.

Independent references: f(x0) computed by hand from the paper's formulas (and the
values printed in the MGH literature), closed-form minimizers, central finite
differences, and scipy's MINPACK Levenberg-Marquardt reaching the certified minimum
(which catches a typo in a data table).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from benchmarks.problems import LEAST_SQUARES, UNCONSTRAINED, LSProblem, Problem, scipy_funcs

NAMES = sorted(UNCONSTRAINED)

# f(x0) at MGH's standard starting points. The first group is exact by hand; the rest are the
# values printed (to 6 digits) in the MGH literature for these starting points.
F_AT_X0 = {
    "rosenbrock": 24.2,  # 4.4^2 + 2.2^2
    "freudenstein_roth": 400.5,  # 19.5^2 + 4.5^2
    "powell_badly_scaled": 1 + (math.exp(-1) - 0.0001) ** 2,
    "brown_badly_scaled": (1 - 1e6) ** 2 + (1 - 2e-6) ** 2 + 1,
    "beale": 1.5**2 + 2.25**2 + 2.625**2,
    "helical_valley": 2500.0,  # theta = 1/2, r1 = -50
    "powell_singular": 215.0,  # r = (-7, -sqrt 5, 1, 4 sqrt 10): 49 + 5 + 1 + 160
    "wood": 19192.0,  # r = (-80, 4, -80 sqrt 0.9 ... ): MGH
    "watson": 30.0,  # r_i = -1 for i <= 29, r_30 = 0, r_31 = -1
    "extended_rosenbrock": 5 * 24.2,
    "extended_powell": 3 * 215.0,
    "broyden_tridiagonal": 21.0,  # r = (-2, -1, ..., -1, -3): 4 + 8 + 9
    "broyden_banded": 360.0,
    "linear_full_rank": 50.0,  # r_i = -1 for i <= 10, -2 for i > 10: 10 + 40
    "jennrich_sampson": 4171.31,
    "bard": 41.6817,
    "gaussian": 3.88811e-6,
    "meyer": 1.69361e9,
    "gulf": 12.1107,
    "box_3d": 1031.15,
    "kowalik_osborne": 5.31317e-3,
    "brown_dennis": 7.92669e6,
    "osborne1": 0.879026,
    "biggs_exp6": 0.779071,
    "osborne2": 2.09342,
}

# Exact minimizers (f = f_opt there).
MINIMIZERS = {
    "rosenbrock": [1.0, 1.0],
    "freudenstein_roth": [5.0, 4.0],
    "brown_badly_scaled": [1e6, 2e-6],
    "beale": [3.0, 0.5],
    "helical_valley": [1.0, 0.0, 0.0],
    "gulf": [50.0, 25.0, 1.5],
    "box_3d": [1.0, 10.0, 1.0],
    "powell_singular": [0.0, 0.0, 0.0, 0.0],
    "wood": [1.0, 1.0, 1.0, 1.0],
    "biggs_exp6": [1.0, 10.0, 1.0, 5.0, 4.0, 3.0],
    "extended_rosenbrock": [1.0] * 10,
    "extended_powell": [0.0] * 12,
    "variably_dimensioned": [1.0] * 10,
    "brown_almost_linear": [1.0] * 10,
    "trigonometric": [0.0] * 10,
    "linear_full_rank": [-1.0] * 10,
}

# Where MINPACK's LM from x0 stops at a documented *local* minimum instead of f_opt.
LOCAL_FROM_X0 = {
    "freudenstein_roth": 48.9842,
    "trigonometric": 2.79506e-5,  # the local minimum reported for n = 10 (global: 0)
}


def test_registry_is_complete_and_consistent():
    assert len(UNCONSTRAINED) >= 30
    assert set(UNCONSTRAINED) == set(LEAST_SQUARES)
    for name in NAMES:
        p, ls = UNCONSTRAINED[name], LEAST_SQUARES[name]
        assert isinstance(p, Problem) and isinstance(ls, LSProblem)
        assert p.name == ls.name == name
        assert p.x0.dtype == torch.float64 and p.x0.shape == (p.n,)
        assert ls.residual_fn(ls.x0).shape == (ls.m,)
        assert ls.m >= ls.n == p.n


@pytest.mark.parametrize("name", NAMES)
def test_fn_is_sum_of_squares_of_residuals(name):
    p, ls = UNCONSTRAINED[name], LEAST_SQUARES[name]
    x = p.x0 + 0.01 * torch.arange(p.n, dtype=torch.float64)
    r = ls.residual_fn(x)
    assert torch.allclose(p.fn(x), (r**2).sum(), rtol=1e-14, atol=0)  # not 0.5 * sum


@pytest.mark.parametrize("name", sorted(F_AT_X0))
def test_value_at_x0(name):
    p = UNCONSTRAINED[name]
    assert float(p.fn(p.x0)) == pytest.approx(F_AT_X0[name], rel=1e-5)


@pytest.mark.parametrize("name", sorted(MINIMIZERS))
def test_value_at_known_minimizer(name):
    p = UNCONSTRAINED[name]
    x = torch.tensor(MINIMIZERS[name], dtype=torch.float64)
    assert float(p.fn(x)) == pytest.approx(p.f_opt, abs=1e-12 * max(1.0, p.f_opt))
    if p.f_opt == 0.0:
        assert torch.linalg.norm(torch.func.grad(p.fn)(x)) < 1e-8


def test_closed_forms():
    # Linear full rank at x0 = 1: sum = 10, r_i = 1 - 1 - 1 = -1 (i <= 10), r_i = -2 (i > 10).
    r = LEAST_SQUARES["linear_full_rank"].residual_fn(torch.ones(10, dtype=torch.float64))
    assert torch.equal(r, torch.tensor([-1.0] * 10 + [-2.0] * 10, dtype=torch.float64))
    # Broyden tridiagonal at -1: (3 + 2)(-1) + 1 + 2 + 1 = -1 inside the band, by hand.
    r = LEAST_SQUARES["broyden_tridiagonal"].residual_fn(-torch.ones(10, dtype=torch.float64))
    expected = torch.full((10,), -1.0, dtype=torch.float64)
    expected[0], expected[-1] = -2.0, -3.0  # no x_0 term: -5 + 0 + 2 + 1; no x_{n+1}: -5 + 1 + 1
    assert torch.equal(r, expected)
    # Chebyquad with n = 1 at x = 1/2: T_1 = 0, so r = (0 - 0).
    r = LEAST_SQUARES["chebyquad"].residual_fn(torch.tensor([0.5], dtype=torch.float64))
    assert torch.allclose(r, torch.zeros(1, dtype=torch.float64))
    # Chebyquad n = 2 has the zero at the Gauss-Chebyshev-like nodes 1/2 -+ 1/(2 sqrt 3).
    nodes = torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], dtype=torch.float64)
    assert torch.allclose(
        LEAST_SQUARES["chebyquad"].residual_fn(nodes), torch.zeros(2, dtype=torch.float64)
    )


@pytest.mark.parametrize("name", NAMES)
def test_gradient_matches_finite_differences(name):
    p = UNCONSTRAINED[name]
    x = p.x0 + 0.05 * torch.linspace(-1, 1, p.n, dtype=torch.float64) * (1 + p.x0.abs())
    grad = torch.func.grad(p.fn)(x)
    fd = torch.empty(p.n, dtype=torch.float64)
    for i in range(p.n):
        h = 1e-6 * max(1.0, abs(float(x[i])))
        e = torch.zeros(p.n, dtype=torch.float64)
        e[i] = h
        fd[i] = (p.fn(x + e) - p.fn(x - e)) / (2 * h)
    scale = float(grad.abs().max()) + 1e-12
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-6 * scale), (grad, fd)


@pytest.mark.parametrize("name", NAMES)
def test_float32_and_torch_func(name):
    p = UNCONSTRAINED[name]
    x32 = p.x0.float()
    v32 = p.fn(x32)
    assert v32.dtype == torch.float32 and v32.dim() == 0
    assert float(v32) == pytest.approx(float(p.fn(p.x0)), rel=1e-4, abs=1e-6)
    hessian = torch.func.hessian(p.fn)(p.x0)
    assert hessian.shape == (p.n, p.n)
    assert torch.allclose(hessian, hessian.T, rtol=1e-8, atol=1e-8 * float(hessian.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_minpack_reaches_certified_minimum(name):
    ls = LEAST_SQUARES[name]
    if ls.f_opt is None:
        pytest.skip("no certified minimum")

    def fun(x):
        return ls.residual_fn(torch.as_tensor(x)).numpy()

    def jac(x):
        return torch.func.jacfwd(ls.residual_fn)(torch.as_tensor(x)).numpy()

    res = scipy.optimize.least_squares(
        fun, ls.x0.numpy(), jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000
    )
    f = 2 * res.cost
    target = LOCAL_FROM_X0.get(name, ls.f_opt)
    # MGH print f_opt to 6 significant digits.
    assert f == pytest.approx(target, rel=2e-5, abs=1e-10), (f, target)


def test_scipy_funcs_agree_with_torch():
    p = UNCONSTRAINED["wood"]
    funcs = scipy_funcs(p)
    x = np.array([0.5, -0.3, 1.2, 0.7])
    assert funcs.fun(x) == pytest.approx(float(p.fn(torch.as_tensor(x))), rel=1e-15)
    h = funcs.hess(x)
    v = np.array([1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(funcs.hessp(x, v), h @ v, rtol=1e-12)
    fd = np.array([(funcs.fun(x + 1e-6 * e) - funcs.fun(x - 1e-6 * e)) / 2e-6 for e in np.eye(4)])
    np.testing.assert_allclose(funcs.jac(x), fd, rtol=1e-6)
    res = scipy.optimize.minimize(funcs.fun, p.x0.numpy(), jac=funcs.jac, method="BFGS")
    assert res.fun < 1e-8
    ls_funcs = scipy_funcs(LEAST_SQUARES["wood"])
    assert ls_funcs.fun(x) == funcs.fun(x)
