"""Bounded least squares (``sf.trust_region_reflective``) against independent references.

* The trust-region subproblem solve against a dense solve of ``(A^T A + alpha I) s = -A^T b``
  with ``alpha`` found by bisection on ``|s(alpha)| = radius``.
* Whole runs against ``scipy.optimize.least_squares(method="trf")`` on bounded NIST fits and
  an MGH problem (same optimum and active set), against ``scipy.optimize.lsq_linear`` on a
  bounded linear problem, and with infinite bounds against the unbounded
  Levenberg-Marquardt optimum; every iterate is asserted inside the box.
* Pytree params and bounds, float32, and the errors for bad inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize as so
import torch

import soo_func as sf
from benchmarks.nist import NIST, optimum_cut_bounds, positivity_bounds
from benchmarks.problems import LEAST_SQUARES
from soo_func.bounds.reflective_step import ScaledModel, trust_region_solution

D = torch.float64


def scipy_trf(residual_fn, x0: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    def fun(x):
        return residual_fn(torch.from_numpy(x)).numpy()

    def jac(x):
        return torch.func.jacfwd(residual_fn)(torch.from_numpy(x)).numpy()

    return so.least_squares(fun, x0.numpy(), jac=jac, bounds=(lower.numpy(), upper.numpy()),
                            method="trf", ftol=1e-14, xtol=1e-14, gtol=1e-14, max_nfev=5000)  # fmt: skip


def feasible_run(residual_fn, x0, lower, upper, **kwargs):
    """``least_squares`` with ``trust_region_reflective``, asserting every iterate in the box."""
    lo = torch.as_tensor(-math.inf if lower is None else lower, dtype=x0.dtype)
    hi = torch.as_tensor(math.inf if upper is None else upper, dtype=x0.dtype)

    def inside(row, params):
        assert bool(((params >= lo) & (params <= hi)).all()), f"step {row['step']} left the box"

    kwargs = {"gtol": 1e-12, "ftol": 1e-14, "max_steps": 500, **kwargs}
    optimizer = sf.trust_region_reflective(lower, upper)
    return sf.least_squares(residual_fn, x0, optimizer, callback=inside, **kwargs)


@pytest.mark.parametrize("seed", range(8))
def test_trust_region_solution_matches_a_dense_secular_solve(seed):
    gen = torch.Generator().manual_seed(seed)
    m, n = 7, 4
    a = torch.randn(m, n, generator=gen, dtype=D)
    b = torch.randn(m, generator=gen, dtype=D)
    u, sigma, vt = torch.linalg.svd(a, full_matrices=False)
    model = ScaledModel(torch.ones(n, dtype=D), a.T @ b, a, torch.zeros(n, dtype=D), sigma, vt,
                        u.T @ b)  # fmt: skip
    newton = torch.linalg.lstsq(a, -b[:, None]).solution[:, 0]
    radius = float(newton.norm()) * (0.3 if seed % 2 else 1.5)
    step = trust_region_solution(model, radius)
    if seed % 2 == 0:  # the Gauss-Newton step is inside: it is the answer
        assert torch.allclose(step, newton, rtol=1e-10, atol=1e-12)
        return

    def s_of(alpha):
        return torch.linalg.solve(a.T @ a + alpha * torch.eye(n, dtype=D), -a.T @ b)

    low, high = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if float(s_of(mid).norm()) > radius else (low, mid)
    exact = s_of(high)
    assert float(step.norm()) <= radius * (1 + 1e-12)
    assert float(step.norm()) >= 0.9 * radius  # Moré's test: within 10% of the radius
    cosine = float(step @ exact) / float(step.norm() * exact.norm())
    assert cosine > 0.99

    def model_value(s):
        return float(0.5 * (a @ s + b).square().sum() - 0.5 * b.square().sum())

    assert model_value(step) <= 0.98 * model_value(exact)  # decrease close to the optimum


@pytest.mark.parametrize("name", ["Misra1a", "DanWood", "Rat42", "BoxBOD"])
@pytest.mark.parametrize("bounds", ["positive", "cut"])
def test_agrees_with_scipy_trf_on_bounded_nist_fits(name, bounds):
    problem = NIST[name]
    lower, upper = (positivity_bounds if bounds == "positive" else optimum_cut_bounds)(problem)
    x0 = torch.minimum(torch.maximum(problem.starts()[1], lower), upper)
    residual_fn = problem.residual_fn()
    ours = feasible_run(residual_fn, x0, lower, upper)
    theirs = scipy_trf(residual_fn, x0, lower, upper)
    assert math.isclose(float(ours.value), theirs.cost, rel_tol=1e-8)
    assert np.allclose(ours.params.numpy(), theirs.x, rtol=1e-5)
    active = sf.active_bounds(ours.params, lower, upper)
    assert np.array_equal(active.numpy(), theirs.active_mask)
    if bounds == "cut":  # the cut bound is active: the upper bound of the first parameter
        assert int(active[0]) == 1 and float(ours.params[0]) == float(upper[0])


def test_agrees_with_scipy_trf_on_a_bounded_mgh_problem():
    problem = LEAST_SQUARES["helical_valley"]
    lower = torch.tensor([-math.inf, -math.inf, -0.5], dtype=D)
    upper = torch.tensor([0.8, math.inf, math.inf], dtype=D)
    x0 = problem.x0.clone()
    ours = feasible_run(problem.residual_fn, x0, lower, upper)
    theirs = scipy_trf(problem.residual_fn, x0, lower, upper)
    assert math.isclose(float(ours.value), theirs.cost, rel_tol=1e-8)
    assert np.allclose(ours.params.numpy(), theirs.x, atol=1e-6)
    assert np.array_equal(sf.active_bounds(ours.params, lower, upper).numpy(), theirs.active_mask)


def test_bounded_linear_least_squares_matches_lsq_linear():
    """``0.5 |A x - b|^2`` on ``[0, 1]^n``: the solution and active set of scipy's
    ``lsq_linear`` (an independent bounded-variable least-squares solver)."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(20, 8, generator=gen, dtype=D)
    b = 3 * torch.randn(20, generator=gen, dtype=D)
    x0 = torch.full((8,), 0.5, dtype=D)
    ours = feasible_run(lambda x: a @ x - b, x0, 0.0, 1.0, gtol=1e-9)
    ref = so.lsq_linear(a.numpy(), b.numpy(), bounds=(0.0, 1.0), tol=1e-14, method="bvls")
    active = sf.active_bounds(ours.params, 0.0, 1.0)
    assert bool((active != 0).any()) and bool((active == 0).any())  # both kinds exercised
    assert np.allclose(ours.params.numpy(), ref.x, atol=1e-8)
    assert np.array_equal(active.numpy(), ref.active_mask)
    assert ours.converged, ours.reason


def test_infinite_bounds_reach_the_unbounded_levenberg_marquardt_optimum():
    problem = NIST["Misra1a"]
    residual_fn, x0 = problem.residual_fn(), problem.starts()[0]
    inf = torch.full((2,), math.inf, dtype=D)
    ours = feasible_run(residual_fn, x0.clone(), -inf, inf)
    free = feasible_run(residual_fn, x0.clone(), None, None)
    lm = sf.least_squares(residual_fn, x0.clone(), gtol=1e-12, max_steps=500)
    for run in (ours, free):
        assert np.allclose(run.params.numpy(), lm.params.numpy(), rtol=1e-7)
        assert np.allclose(run.params.numpy(), problem.certified().numpy(), rtol=1e-7)
        assert sf.active_bounds(run.params, -inf, inf).abs().sum() == 0


def test_pytree_params_and_bounds():
    t = torch.linspace(0, 3, 30, dtype=D)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5

    def residual_fn(p):
        return {"fit": p["amp"] * torch.exp(-p["rate"] * t) + p["shift"] - y}

    params = {"amp": torch.tensor(1.0, dtype=D), "rate": torch.tensor(0.5, dtype=D),
              "shift": torch.tensor([0.0], dtype=D)}  # fmt: skip
    lower = {"amp": torch.tensor(0.0, dtype=D), "rate": torch.tensor(0.0, dtype=D),
             "shift": torch.tensor([-math.inf], dtype=D)}  # fmt: skip
    upper = {"amp": 1.5, "rate": math.inf, "shift": torch.tensor([math.inf], dtype=D)}
    upper = {k: torch.as_tensor(v, dtype=D) for k, v in upper.items()}
    result = sf.least_squares(residual_fn, params, sf.trust_region_reflective(lower, upper),
                              gtol=1e-12, ftol=1e-14)  # fmt: skip
    active = sf.active_bounds(result.params, lower, upper)
    assert float(result.params["amp"]) == 1.5 and int(active["amp"]) == 1
    assert int(active["rate"]) == 0 and int(active["shift"][0]) == 0
    flat = lambda p: torch.cat([p["amp"][None], p["rate"][None], p["shift"]])  # noqa: E731
    theirs = scipy_trf(lambda x: residual_fn({"amp": x[0], "rate": x[1], "shift": x[2:]})["fit"],
                       flat(params), flat(lower), flat(upper))  # fmt: skip
    assert np.allclose(flat(result.params).numpy(), theirs.x, rtol=1e-6)


def test_float32():
    problem = NIST["DanWood"]
    lower, upper = optimum_cut_bounds(problem, torch.float32)
    residual_fn = problem.residual_fn(torch.float32)
    x0 = torch.minimum(problem.starts(torch.float32)[1], upper)
    result = feasible_run(residual_fn, x0, lower, upper, gtol=1e-6, ftol=1e-7)
    assert result.params.dtype == torch.float32
    reference = feasible_run(problem.residual_fn(), x0.double(), lower.double(), upper.double())
    assert math.isclose(float(result.value), float(reference.value), rel_tol=1e-4)
    assert np.allclose(result.params.numpy(), reference.params.numpy(), rtol=1e-3)
    assert int(sf.active_bounds(result.params, lower, upper)[0]) == 1


def test_bad_inputs():
    residual_fn = NIST["DanWood"].residual_fn()
    x0 = torch.tensor([0.7, 4.0], dtype=D)
    with pytest.raises(ValueError, match="lower > upper"):
        sf.least_squares(residual_fn, x0, sf.trust_region_reflective(1.0, 0.0))
    with pytest.raises(ValueError, match="does not broadcast"):
        sf.least_squares(residual_fn, x0, sf.trust_region_reflective(torch.zeros(3, dtype=D)))
    with pytest.raises(ValueError, match=r"outside the bounds.*project_to_bounds"):
        sf.least_squares(residual_fn, x0, sf.trust_region_reflective(upper=0.5))
    start = sf.project_to_bounds(x0, None, 0.5)  # the fix the message names
    result = sf.least_squares(residual_fn, start, sf.trust_region_reflective(upper=0.5))
    assert bool((result.params <= 0.5).all())
    with pytest.raises(TypeError, match=r"trust_region_reflective.*residual_fn"):
        sf.minimize(lambda p: (p**2).sum(), x0, sf.trust_region_reflective(0.0))
    with pytest.raises(ValueError, match="max_trials"):
        sf.trust_region_reflective(max_trials=0)
