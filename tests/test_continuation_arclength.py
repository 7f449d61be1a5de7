"""Tests of soo_func.continuation.arclength: the curve against closed forms (a 1-D
gradient equation whose Keller curve has two folds, the convex curve of a quadratic),
Branin's passage through several stationary points, the fallback, purity, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import assert_update_is_pure

import soo_func as sf
from benchmarks.bench_homotopy import solved
from benchmarks.problems import UNCONSTRAINED
from soo_func.continuation import arclength_homotopy, reset_at_stage_change


def tilted_double_well(x: torch.Tensor) -> torch.Tensor:
    """``f = x^4/4 - x^2 + x/2``: ``f' = x^3 - 2x + 1/2`` has roots -1.5257 (global
    minimizer, f = -1.736), 0.2587 (maximizer) and 1.2670 (local minimizer, f = -0.328);
    ``f'' = 0`` at ``+-sqrt(2/3)``."""
    return (0.25 * x**4 - x**2 + 0.5 * x).sum()


ROOTS = (-1.5256871, 0.2586520, 1.2670351)


def follow(fn, x0, transform, steps):
    """Drive ``chain(transform, newton_krylov(), armijo())`` by hand; the path points
    ``(x, t)`` of the homotopy's state after each update, and the final params."""
    opt = sf.chain(transform, sf.newton_krylov(), sf.armijo())
    state, x, points = opt.init(x0), x0, []
    for _ in range(steps):
        value, grad = sf.value_and_grad(fn)(x)
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fn)
        inner = state.states[0]
        if not bool(inner.finished | inner.descending):
            points.append((inner.point.clone(), float(inner.t)))
        x = sf.apply_updates(x, updates)
    return points, state.states[0], x


@pytest.mark.parametrize("solver", ["dense", "minres"])
def test_keller_curve_passes_both_folds_on_the_closed_form(dtype, solver):
    # Keller's curve grad f(x) = (1 - t) grad f(x0) is t = 1 - f'(x) / f'(x0): from x0 = 3
    # it crosses t = 1 at the local minimizer, turns at x = sqrt(2/3) (t > 1), crosses at
    # the maximizer, turns at -sqrt(2/3) (t < 1) and reaches the global minimizer.
    x0 = torch.tensor([3.0], dtype=dtype)
    g0 = 27 - 6 + 0.5
    transform = arclength_homotopy("keller", max_minimizers=2, max_path_steps=200, solver=solver)
    points, state, _ = follow(tilted_double_well, x0, transform, 200)
    xs = [float(x) for x, _ in points]
    ts = [t for _, t in points]
    tol = 1e-7 if dtype == torch.float64 else 1e-3
    for x, t in zip(xs, ts, strict=True):
        assert abs(t - (1 - (x**3 - 2 * x + 0.5) / g0)) <= tol * max(1.0, abs(t))
    assert all(b < a for a, b in itertools.pairwise(xs))  # x decreases along it
    peak = max(range(len(ts)), key=ts.__getitem__)
    assert ts[peak] > 1 and min(ts[peak:]) < 1  # t rose past 1, then fell below: two folds
    assert abs(xs[peak] - math.sqrt(2 / 3)) < 0.3  # the first fold, f"(x) = 0
    assert int(state.num_crossings) == 3 and int(state.num_minimizers) == 2
    assert abs(float(state.best) - ROOTS[0]) < (1e-6 if dtype == torch.float64 else 1e-3)


def test_keller_arclength_finds_the_global_minimizer_newton_misses():
    x0 = torch.tensor([3.0], dtype=torch.float64)
    plain = sf.minimize(tilted_double_well, x0, sf.chain(sf.newton_krylov(), sf.armijo()))
    opt = sf.chain(arclength_homotopy(), sf.newton_krylov(), sf.armijo())
    wrapped = sf.minimize(tilted_double_well, x0, opt, max_steps=300)
    assert abs(float(plain.params) - ROOTS[2]) < 1e-6  # Newton: the local minimizer
    assert wrapped.converged and abs(float(wrapped.params) - ROOTS[0]) < 1e-6
    assert wrapped.history[-1]["continuation_minimizers"] == 2


def test_freudenstein_roth_from_ten_times_the_start():
    # Newton-Krylov ends at the local minimizer (f = 48.98); Keller's curve passes it,
    # then a saddle, then the global minimizer (5, 4) (Branin's method).
    problem = UNCONSTRAINED["freudenstein_roth"]
    x0 = 10 * problem.x0
    plain = sf.minimize(problem.fn, x0, sf.chain(sf.newton_krylov(), sf.armijo()), gtol=1e-6)
    opt = sf.chain(arclength_homotopy(), sf.newton_krylov(), sf.armijo())
    wrapped = sf.minimize(problem.fn, x0, opt, gtol=1e-6, max_steps=500)
    assert not solved(plain, problem.f_opt) and abs(float(plain.value) - 48.98425) < 1e-3
    assert solved(wrapped, problem.f_opt)
    torch.testing.assert_close(wrapped.params, torch.tensor([5.0, 4.0], dtype=torch.float64))


def test_a_run_stopped_on_the_curve_returns_the_best_minimizer_found():
    # While the point explores Keller's curve its value is far above the descent's
    # minimizer (48.98); a driver stopped there returns that minimizer (the published
    # incumbent), never the exploring point, so a small max_steps loses nothing to Newton.
    problem = UNCONSTRAINED["freudenstein_roth"]
    x0 = 10 * problem.x0
    opt = sf.chain(arclength_homotopy(), sf.newton_krylov(), sf.armijo())
    full = sf.minimize(problem.fn, x0, opt, gtol=1e-6, max_steps=500)
    on_curve = [
        row["step"]
        for row in full.history
        if row.get("continuation_path_steps", 0) >= 1 and row["value"] > 60.0
    ]
    assert on_curve, "the curve never left the local minimizer's neighbourhood"
    stopped = sf.minimize(problem.fn, x0, opt, gtol=1e-6, max_steps=on_curve[0])
    assert stopped.history[-1]["value"] > 60.0  # the driver's last point is on the curve
    assert "incumbent" in stopped.reason and not stopped.converged
    assert abs(float(stopped.value) - 48.98425) < 1e-3
    assert float(problem.fn(stopped.params)) == pytest.approx(float(stopped.value), rel=1e-12)


@pytest.mark.parametrize("solver", ["dense", "minres"])
def test_convex_curve_of_a_quadratic_is_the_shifted_solve(dtype, solver):
    # t (A x - b) + (1 - t) s (x - x0) = 0  =>  (t A + (1 - t) s I) x = t b + (1 - t) s x0.
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = m @ m.T + 4 * torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    x0 = 5 * torch.randn(4, generator=gen, dtype=torch.float64)

    def fn(x):
        return 0.5 * x @ a.to(x.dtype) @ x - b.to(x.dtype) @ x

    g0 = a @ x0 - b
    s = g0.norm() / max(float(x0.norm()), 1.0)
    points, state, _ = follow(
        fn, x0.to(dtype), arclength_homotopy("convex", descend_first=False, solver=solver), 12
    )
    assert len(points) >= 3 and int(state.num_minimizers) == 1
    for x, t in points:
        expected = torch.linalg.solve(t * a + (1 - t) * s * torch.eye(4, dtype=torch.float64),
                                      t * b + (1 - t) * s * x0)  # fmt: skip
        tol = 1e-7 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(x.double(), expected, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(state.best.double(), torch.linalg.solve(a, b), rtol=1e-3, atol=1e-3)


def test_without_a_minimizer_the_chain_restarts_from_the_anchor():
    # f = -x^2/2 + x^4/4 from a start near the maximizer 0 ... and a tiny path budget:
    # no crossing is reached, so the point jumps back to x0 and Newton continues.
    x0 = torch.tensor([0.3, -0.2], dtype=torch.float64)

    def fn(x):
        return (0.25 * x**4 - 0.5 * x**2).sum()

    transform = arclength_homotopy(max_path_steps=1, initial_arclength=1e-3, descend_first=False)
    opt = sf.chain(transform, sf.newton_krylov(), sf.armijo())
    result = sf.minimize(fn, x0, opt, gtol=1e-9, max_steps=100)
    assert result.history[1]["continuation_minimizers"] == 0
    assert result.history[1]["converged_ok"] == 1.0
    assert result.converged
    plain = sf.minimize(fn, x0, sf.chain(sf.newton_krylov(), sf.armijo()), gtol=1e-9)
    torch.testing.assert_close(result.params, plain.params)


def test_the_descent_point_is_kept_when_the_curve_finds_only_worse_minimizers():
    # Powell badly scaled from 10x: Keller's curve crosses t = 1 at a saddle (f = 2), then
    # at a local minimizer with f = 1.04; Newton from x0 solves it. Descending first
    # keeps Newton's point as a candidate, so the homotopy loses nothing to it.
    problem = UNCONSTRAINED["powell_badly_scaled"]
    x0 = 10 * problem.x0
    runs = {}
    for first in (False, True):
        transform = arclength_homotopy(max_path_steps=60, descend_first=first)
        opt = sf.chain(transform, sf.newton_krylov(), sf.armijo())
        runs[first] = sf.minimize(problem.fn, x0, opt, gtol=1e-6, max_steps=100)
    assert abs(float(runs[False].value) - 1.0403) < 1e-3
    assert runs[False].history[-1]["continuation_minimizers"] >= 1
    assert solved(runs[True], problem.f_opt)
    assert runs[True].history[-1]["continuation_descent_steps"] >= 1


def test_arclength_update_is_pure():
    x0 = torch.tensor([3.0], dtype=torch.float64)
    value, grad = sf.value_and_grad(tilted_double_well)(x0)
    opt = sf.chain(arclength_homotopy(), sf.newton_krylov(), sf.armijo())
    assert_update_is_pure(opt, x0, grad, steps=3, value=value, grad=grad,
                          value_fn=tilted_double_well)  # fmt: skip


def test_homotopy_path_option_builds_the_arclength_follower():
    x0 = torch.tensor([3.0], dtype=torch.float64)
    opt = sf.chain(sf.homotopy("keller", path="arclength"), sf.newton_krylov(), sf.armijo())
    result = sf.minimize(tilted_double_well, x0, opt, max_steps=300)
    assert abs(float(result.params) - ROOTS[0]) < 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"family": "smooth"}, "family"),
        ({"initial_arclength": 0.0}, "initial_arclength"),
        ({"max_minimizers": 0}, "max_minimizers"),
        ({"initial_arclength": 20.0}, "min_step <= initial_arclength <= max_step"),
        ({"krylov_rtol": math.nan}, "krylov_rtol"),
        ({"solver": "lu"}, "solver"),
        ({"max_descent_steps": 0}, "max_descent_steps"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arclength_homotopy(**kwargs)


def test_missing_extras_are_named():
    opt = arclength_homotopy()
    x = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"arclength_homotopy needs .*value_fn"):
        opt.update(x, opt.init(x), x, value=x.sum(), grad=x)


def test_default_homotopy_with_lbfgs_downstream_converges():
    # The follower publishes continuation_restart whenever it moves the point, so a
    # quasi-Newton memory wrapped in reset_at_stage_change never mixes two objectives.
    value_fn = lambda x: ((x - 3) ** 4).sum() + (x**2).sum()  # noqa: E731
    x0 = torch.full((4,), -20.0, dtype=torch.float64)
    lbfgs = reset_at_stage_change(sf.directions.lbfgs())
    opt = sf.chain(sf.homotopy(), lbfgs, sf.armijo())
    result = sf.minimize(value_fn, x0, opt, gtol=1e-8, max_steps=500)
    assert result.converged and float(result.grad_norm) <= 1e-7
    assert result.history[-1]["continuation_minimizers"] >= 1


def test_homotopy_rejects_options_of_the_other_path():
    with pytest.raises(ValueError, match="schedule"):
        sf.homotopy("keller", path="arclength", schedule="linear")
    with pytest.raises(ValueError, match="initial_arclength"):
        sf.homotopy("convex", initial_arclength=0.2)
    opt = sf.homotopy(path="arclength", initial_arclength=0.2)  # passed through
    x = torch.tensor([3.0], dtype=torch.float64)
    value, grad = sf.value_and_grad(tilted_double_well)(x)
    state = opt.update(grad, opt.init(x), x, value=value, grad=grad, value_fn=tilted_double_well)[1]
    assert float(state.step) == pytest.approx(0.2 * 3.0)
