"""Moré's trust-region control of the Levenberg-Marquardt parameter (MINPACK lmder):
the parameter search against the dense normal equations, the radius rule on numbers,
and MGH10 from NIST start 1 (which Nielsen's damping misses) against scipy's lm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import soo_func as sf
from benchmarks.nist import NIST
from soo_func.searches.more_radius import lm_parameter, more_radius_update

T = torch.tensor


def _problem(m=9, n=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(m, n, generator=gen, dtype=dtype) * torch.logspace(0, 3, n, dtype=dtype)
    r = torch.randn(m, generator=gen, dtype=dtype)
    diag = torch.rand(n, generator=gen, dtype=dtype) + 0.5
    return jac, r, diag


@pytest.mark.parametrize("radius", [1e-4, 1e-2, 0.3])
def test_parameter_solves_the_damped_normal_equations_on_the_radius(radius):
    """(J^T J + lam D^2) p = -J^T r (numpy solve) and |D p| within 10% of the radius."""
    jac, r, diag = _problem()
    gn = np.linalg.lstsq(jac.numpy(), -r.numpy(), rcond=None)[0]
    assert np.linalg.norm(diag.numpy() * gn) > 1.1 * radius  # the radius binds
    out = lm_parameter(jac, r, diag, T(radius, dtype=torch.float64))
    lam = float(out.damping)
    assert lam > 0
    J, d = jac.numpy(), diag.numpy()
    expected = np.linalg.solve(J.T @ J + lam * np.diag(d * d), -J.T @ r.numpy())
    np.testing.assert_allclose(out.step.numpy(), expected, rtol=1e-8, atol=1e-14)
    scaled = np.linalg.norm(d * expected)
    assert abs(scaled - radius) <= 0.1 * radius
    assert float(out.scaled_norm) == pytest.approx(scaled, rel=1e-10)


def test_parameter_is_zero_when_the_gauss_newton_step_fits():
    jac, r, diag = _problem(seed=1)
    gn = np.linalg.lstsq(jac.numpy(), -r.numpy(), rcond=None)[0]
    radius = np.linalg.norm(diag.numpy() * gn)  # within 1.1 radius
    out = lm_parameter(jac, r, diag, T(radius, dtype=torch.float64))
    assert float(out.damping) == 0.0
    np.testing.assert_allclose(out.step.numpy(), gn, rtol=1e-9)


def test_parameter_on_a_rank_deficient_jacobian_and_float32():
    jac, r, diag = _problem(seed=2, dtype=torch.float32)
    jac = torch.cat([jac, jac[:, :1]], dim=1)  # a repeated column
    diag = torch.cat([diag, diag[:1]])
    out = lm_parameter(jac, r, diag, T(1e-2))
    assert out.step.dtype == torch.float32 and torch.isfinite(out.step).all()
    assert abs(float(out.scaled_norm) - 1e-2) <= 1e-3


def test_radius_rule_on_numbers():
    """MINPACK lmder's rule: rho <= 1/4 shrinks to mu min(radius, 10 |Dp|), mu = 1/2 when
    the actual reduction is >= 0, the quadratic-fit value in [0.1, 0.5] otherwise, 0.1
    when the residual grew tenfold; rho >= 3/4 or lam = 0: 2 |Dp|; otherwise unchanged."""
    one = T(1.0, dtype=torch.float64)

    def rule(ratio, norm, lam, trial, decrease, radius=1.0, value=1.0):
        return float(
            more_radius_update(
                radius * one,
                ratio * one,
                norm * one,
                lam * one,
                value * one,
                trial * one,
                decrease * one,
            )
        )

    assert rule(0.1, 0.05, 1.0, 0.95, 0.5) == pytest.approx(0.5 * 0.5)  # 10|Dp| < radius
    assert rule(0.1, 0.5, 1.0, 0.95, 0.5) == pytest.approx(0.5)  # actual >= 0: mu = 1/2
    # actual = 1 - 1.2 = -0.2, dirder = -0.5: mu = 0.5 * -0.5 / (-0.5 - 0.1) = 5/12
    assert rule(-0.4, 0.5, 1.0, 1.2, 0.5) == pytest.approx(5 / 12)
    assert rule(-1.0, 0.5, 1.0, 200.0, 0.5) == pytest.approx(0.1)  # grew tenfold
    assert rule(-1.0, 0.5, 1.0, float("nan"), 0.5) == pytest.approx(0.1)
    assert rule(0.8, 0.4, 1.0, 0.5, 0.5) == pytest.approx(0.8)  # grows to 2 |Dp|
    assert rule(0.5, 0.4, 0.0, 0.5, 0.5) == pytest.approx(0.8)  # lam = 0: 2 |Dp|
    assert rule(0.5, 0.4, 1.0, 0.5, 0.5) == pytest.approx(1.0)  # unchanged


def test_mgh10_from_start_1_reaches_the_certified_values_like_scipy_lm():
    """Nielsen's damping (damping_rule="nielsen") drives b1 to ~1e-17 from MGH10's start 1
    and stalls; Moré's radius control (the default with the dense solver) reaches the
    certified parameters, in a number of steps comparable to MINPACK's (scipy lm: 299
    residual and 255 Jacobian evaluations)."""
    problem = NIST["MGH10"]
    residual_fn = problem.residual_fn()
    x0 = problem.starts()[0]
    certified = np.array(problem.certified_params)
    result = sf.least_squares(residual_fn, x0, max_steps=1000, gtol=1e-14)
    assert np.all(np.abs(result.params.numpy() - certified) <= 1e-6 * np.abs(certified))
    assert result.num_steps <= 500
    nielsen = sf.least_squares(
        residual_fn, x0, sf.levenberg_marquardt(damping_rule="nielsen"), max_steps=300
    )
    assert float(nielsen.params[0]) < 1e-10  # the failure this rule fixes (a real check)


def test_more_rule_needs_the_dense_solver():
    def residual_fn(x):
        return x - 1

    with pytest.raises(ValueError, match="more"):
        sf.least_squares(
            residual_fn,
            torch.zeros(3, dtype=torch.float64),
            sf.levenberg_marquardt(damping_rule="more", solver="cg"),
        )
