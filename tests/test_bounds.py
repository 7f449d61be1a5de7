"""L-BFGS-B (soo_func.bounds) against independent references.

* The generalized Cauchy point against a sequential scan of the breakpoints with the dense
  model matrix (BLNZ Algorithm CP as written in the paper), and the subspace step against a
  dense solve of the reduced Newton system.
* ``lbfgs_b`` against scipy's L-BFGS-B on bounded problems (minimizers, active sets), with
  every iterate asserted inside the box; a bounded convex quadratic against its KKT point.
* The box helpers and the errors for bad bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize as so
import torch

import soo_func as sf
from soo_func.bounds.box import Box, flat_box
from soo_func.bounds.cauchy import breakpoints, generalized_cauchy_point, subspace_minimizer

D = torch.float64


def random_model(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (), generator=gen))
    m2 = 2 * int(torch.randint(1, 4, (), generator=gen))
    lower = -torch.rand(n, generator=gen, dtype=D)
    upper = torch.rand(n, generator=gen, dtype=D)
    lower[torch.rand(n, generator=gen) < 0.2] = -math.inf
    upper[torch.rand(n, generator=gen) < 0.2] = math.inf
    box = Box(lower, upper)
    x = box.project(0.5 * torch.randn(n, generator=gen, dtype=D))
    g = 2 * torch.randn(n, generator=gen, dtype=D)
    g[torch.rand(n, generator=gen) < 0.1] = 0.0
    sigma = torch.rand((), generator=gen, dtype=D) + 0.2
    columns = torch.randn(m2, n, generator=gen, dtype=D)
    a = torch.randn(m2, m2, generator=gen, dtype=D)
    kernel = 0.3 * a @ a.T
    dense = sigma * torch.eye(n, dtype=D) + columns.T @ kernel @ columns
    return x, g, box, sigma, columns, kernel, dense


def sequential_cauchy_point(x, g, box, dense) -> torch.Tensor:
    """BLNZ Algorithm CP with the dense matrix: walk the breakpoints in order, stop at the
    first local minimizer of the model along the projected path."""
    t = breakpoints(x, g, box)
    d = torch.where(t > 0, -g, torch.zeros_like(g))
    z = torch.zeros_like(x)
    t_prev = 0.0
    while True:
        slope = float(g @ d + d @ dense @ z)
        curvature = float(d @ dense @ d)
        moving = (t > t_prev) & (d != 0)
        t_next = float(t[moving].min()) if bool(moving.any()) else math.inf
        if slope >= 0:
            t_star = t_prev
            break
        if curvature > 0 and -slope / curvature < t_next - t_prev:
            t_star = t_prev - slope / curvature
            break
        if math.isinf(t_next):
            t_star = t_prev  # unbounded along the path: cannot happen with B > 0
            break
        z = z + (t_next - t_prev) * d
        d = torch.where(t <= t_next, torch.zeros_like(d), d)
        t_prev = t_next
    return box.project(x - t_star * g)


@pytest.mark.parametrize("seed", range(60))
def test_cauchy_point_matches_the_sequential_algorithm(seed):
    x, g, box, sigma, columns, kernel, dense = random_model(seed)
    cauchy = generalized_cauchy_point(x, g, box, sigma, columns, kernel)
    expected = sequential_cauchy_point(x, g, box, dense)
    assert torch.allclose(cauchy.point, expected, rtol=1e-10, atol=1e-12)
    assert bool(((cauchy.point >= box.lower) & (cauchy.point <= box.upper)).all())


@pytest.mark.parametrize("seed", range(60))
def test_subspace_step_matches_the_dense_reduced_newton_step(seed):
    """Where the subspace Newton point stays in the box, it is the dense solve of
    ``B_FF d_F = -(g + B (x^c - x))_F``; the returned point is always feasible and, when
    it moves, a descent direction from ``x``."""
    x, g, box, sigma, columns, kernel, dense = random_model(seed)
    cauchy = generalized_cauchy_point(x, g, box, sigma, columns, kernel)
    target = subspace_minimizer(x, g, box, sigma, columns, kernel, cauchy)
    assert bool(((target >= box.lower) & (target <= box.upper)).all())
    free = cauchy.free
    if bool(free.any()):
        rhs = -(g + dense @ (cauchy.point - x))[free]
        d_free = torch.linalg.solve(dense[free][:, free], rhs)
        newton = cauchy.point.clone()
        newton[free] = newton[free] + d_free
        if bool(((newton >= box.lower) & (newton <= box.upper)).all()):
            assert torch.allclose(target, newton, rtol=1e-9, atol=1e-11)
    assert float(g @ (target - x)) <= 1e-12


def rosenbrock(p):
    x = p["x"]
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def scipy_lbfgsb(fn, x0: torch.Tensor, lower: float, upper: float):
    def value(z):
        return float(fn({"x": torch.tensor(z)}))

    def grad(z):
        return torch.func.grad(fn)({"x": torch.tensor(z)})["x"].numpy()

    bounds = [(lower, upper)] * x0.numel()
    return so.minimize(value, x0.numpy(), jac=grad, method="L-BFGS-B", bounds=bounds,
                       options={"gtol": 1e-8, "ftol": 1e-15, "maxiter": 2000})  # fmt: skip


def feasible_run(fn, x0, lower, upper, **kwargs):
    """``minimize`` with ``lbfgs_b``, asserting that every iterate lies in the box."""

    def inside(row, params):
        x = params["x"]
        assert bool(((x >= lower) & (x <= upper)).all()), f"step {row['step']} left the box"

    return sf.minimize(fn, {"x": x0}, sf.lbfgs_b(lower, upper), callback=inside, **kwargs)


@pytest.mark.parametrize(
    "n, lower, upper",
    [(2, -2.0, 0.5), (5, -2.0, 0.8), (8, 0.2, 3.0), (6, -math.inf, 0.7), (10, 1.5, 3.0)],
)
def test_lbfgs_b_agrees_with_scipy_on_bounded_rosenbrock(n, lower, upper):
    """A stationary point on the box (projected gradient 0) no higher than scipy's, and
    where both reach the same minimum the same point and active set (the bounded
    Rosenbrock function has several local minima on a box: n = 10 on [1.5, 3] ends at a
    lower one than scipy's)."""
    x0 = torch.full((n,), -1.2, dtype=D).clamp(lower, upper)
    ours = feasible_run(rosenbrock, x0, lower, upper, gtol=1e-8, max_steps=2000)
    theirs = scipy_lbfgsb(rosenbrock, x0, lower, upper)
    assert ours.converged, ours.reason
    x = ours.params["x"]
    grad = torch.func.grad(rosenbrock)({"x": x})["x"]
    assert float((x - grad).clamp(lower, upper).sub(x).abs().max()) <= 1e-8  # stationary
    assert float(ours.value) <= theirs.fun + 1e-9 * max(1.0, abs(theirs.fun))
    if float(ours.value) >= theirs.fun - 1e-9 * max(1.0, abs(theirs.fun)):  # the same minimum
        assert np.allclose(x.numpy(), theirs.x, atol=1e-5)
        active = sf.active_bounds(ours.params, lower, upper)["x"]
        at_theirs = np.where(theirs.x <= lower, -1, np.where(theirs.x >= upper, 1, 0))
        assert np.array_equal(active.numpy(), at_theirs)


def test_lbfgs_b_solves_a_bounded_convex_quadratic_to_its_kkt_point():
    """``0.5 x^T A x - b^T x`` on ``[0, 1]^n``: the result meets the KKT conditions
    (free entries have zero gradient, entries at 0 a non-negative one, at 1 non-positive),
    the unique minimizer of a strictly convex problem."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(30, 12, generator=gen, dtype=D)
    hessian = a.T @ a / 30 + 0.1 * torch.eye(12, dtype=D)
    b = 2 * torch.randn(12, generator=gen, dtype=D)

    def quadratic(p):
        return 0.5 * p["x"] @ hessian @ p["x"] - b @ p["x"]

    result = feasible_run(quadratic, torch.full((12,), 0.5, dtype=D), 0.0, 1.0, gtol=1e-10)
    assert result.converged, result.reason
    x = result.params["x"]
    grad = hessian @ x - b
    free = (x > 0) & (x < 1)
    assert bool(free.any()) and bool((~free).any())  # the test exercises both kinds
    assert float(grad[free].abs().max()) <= 1e-8
    assert bool((grad[x == 0] >= -1e-10).all()) and bool((grad[x == 1] <= 1e-10).all())


def test_box_helpers_and_bad_bounds():
    params = {"a": torch.tensor([-3.0, 0.5, 4.0], dtype=D), "b": torch.zeros(2, dtype=D)}
    lower = {"a": torch.tensor(-1.0, dtype=D), "b": torch.tensor([-math.inf, 0.0], dtype=D)}
    projected = sf.project_to_bounds(params, lower, 2.0)
    assert projected["a"].tolist() == [-1.0, 0.5, 2.0]
    assert sf.active_bounds(projected, lower, 2.0)["a"].tolist() == [-1, 0, 1]
    assert sf.active_bounds(projected, lower, 2.0)["b"].tolist() == [0, -1]
    with pytest.raises(ValueError, match="lower > upper"):
        flat_box(1.0, 0.0, params)
    with pytest.raises(ValueError, match="NaN"):
        flat_box(float("nan"), None, params)
    with pytest.raises(ValueError, match="does not broadcast"):
        flat_box({"a": torch.zeros(2, dtype=D), "b": 0.0}, None, params)
    with pytest.raises(ValueError, match="outside the bounds"):
        sf.minimize(lambda p: (p["a"] ** 2).sum() + (p["b"] ** 2).sum(), params,
                    sf.lbfgs_b(-1.0, 1.0))  # fmt: skip
    with pytest.raises(ValueError, match="c2"):
        sf.lbfgs_b(c1=0.5, c2=0.1)
