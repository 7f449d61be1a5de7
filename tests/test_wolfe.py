"""Strong Wolfe search: the inequalities on the numbers, scipy agreement, safety, reuse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from helpers import assert_update_is_pure
from test_armijo import phi, random_problem, rosenbrock, run_search, slope

import soo_func as sf
from soo_func.searches import wolfe


def phi_slope(fn, x0, d, alpha):
    """``phi'(alpha)`` recomputed in float64, independently of the search."""
    x = x0.double() + float(alpha) * d.double()
    return float(torch.func.grad(fn)(x) @ d.double())


def assert_strong_wolfe(fn, x0, d, alpha, c1, c2, tag=""):
    f0, df0 = phi(fn, x0, d, 0.0), slope(fn, x0, d)
    assert df0 < 0
    assert phi(fn, x0, d, alpha) <= f0 + c1 * alpha * df0 + 1e-12 * abs(f0), tag
    assert abs(phi_slope(fn, x0, d, alpha)) <= c2 * abs(df0) * (1 + 1e-9), tag


# --- the strong Wolfe inequalities ---------------------------------------------------------


@pytest.mark.parametrize(("c1", "c2"), [(1e-4, 0.9), (1e-4, 0.1), (0.3, 0.4)])
@pytest.mark.parametrize("initial_step", ["unit", "previous_decrease", 1e-3, 30.0])
def test_accepted_steps_satisfy_strong_wolfe(initial_step, c1, c2):
    search = wolfe(slope_rtol=c1, curvature_rtol=c2, initial_step=initial_step)
    for seed in range(30):
        fn, x0, d = random_problem(seed)
        updates, state = run_search(search, fn, x0, d)
        alpha = float(state.step_size)
        assert not bool(state.search_failed), seed
        torch.testing.assert_close(updates, alpha * d, rtol=0, atol=0)
        assert_strong_wolfe(fn, x0, d, alpha, c1, c2, seed)
        # the published value and gradient are those at the accepted point
        value, g_new = sf.value_and_grad(fn)(x0 + updates)
        assert torch.equal(state.next_value, value)
        torch.testing.assert_close(state.next_grad, g_new, rtol=0, atol=0)
        assert int(state.num_search_grads) == int(state.num_search_evals)


# --- agreement with scipy.optimize.line_search --------------------------------------------


def scipy_search(fn, x0, d, c1, c2):
    def f(x):
        return float(fn(torch.as_tensor(x)))

    def g(x):
        return torch.func.grad(fn)(torch.as_tensor(x)).numpy()

    x = x0.double().numpy()
    out = scipy.optimize.line_search(f, g, x, d.double().numpy(), g(x), f(x), c1=c1, c2=c2)
    return out[0]


def quadratic_ray(exact_step: float):
    """A convex quadratic and steepest descent, with its exact line minimizer at ``exact_step``."""
    a = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    x0 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    g = a @ x0
    scale = float(g @ g / (g @ a @ g)) / exact_step

    def fn(x):
        return 0.5 * scale * x @ a @ x

    return fn, x0, -scale * g


@pytest.mark.parametrize("exact_step", [0.25, 0.6, 3.0, 11.5])
def test_quadratic_exact_minimizer_agrees_with_scipy_and_closed_form(exact_step):
    # c2 = 0.1 rejects the unit step; both searches interpolate the quadratic exactly
    # (scipy by bracketing 2, 4, ... and zooming), so both must return the closed form.
    # The acceptable set is [0.9, 1.1] * exact_step; it holds none of scipy's trials 1, 2, 4,
    # 8, 16 (with 17, say, scipy would rightly stop at 16).
    fn, x0, d = quadratic_ray(exact_step)
    _, state = run_search(wolfe(c2=0.1), fn, x0, d)
    ours = float(state.step_size)
    theirs = scipy_search(fn, x0, d, 1e-4, 0.1)
    assert ours == pytest.approx(exact_step, rel=1e-10)
    assert theirs == pytest.approx(exact_step, rel=1e-10)
    # the unit step, then the exact minimizer (beyond 10 the growth bound takes two more)
    assert int(state.num_search_evals) == (2 if exact_step <= 10 else 4)


def test_same_first_trial_acceptance_as_scipy():
    # Both try alpha = 1 first: where 1 meets strong Wolfe both must return exactly 1, and
    # where it does not, neither may.
    accepted = rejected = 0
    for seed in range(40):
        fn, x0, d = random_problem(seed)
        for c2 in (0.9, 0.5):
            _, state = run_search(wolfe(c1=1e-4, c2=c2), fn, x0, d)
            ours = float(state.step_size)
            theirs = scipy_search(fn, x0, d, 1e-4, c2)
            if theirs is None:
                continue
            unit_ok = phi(fn, x0, d, 1.0) <= phi(fn, x0, d, 0) + 1e-4 * slope(fn, x0, d) and abs(
                phi_slope(fn, x0, d, 1.0)
            ) <= c2 * abs(slope(fn, x0, d))
            assert (ours == 1.0) == unit_ok == (theirs == 1.0), (seed, c2, ours, theirs)
            accepted += unit_ok
            rejected += not unit_ok
            assert_strong_wolfe(fn, x0, d, theirs, 1e-4, c2)
    assert accepted > 5 and rejected > 5


def convex_problem(seed: int, n: int = 4):
    """``0.5 x'Ax + b'x + sum w exp(u'x)``: strictly convex, ``phi'' >= d'Ad`` on any ray."""
    gen = torch.Generator().manual_seed(1000 + seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T / n + 0.2 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    u = torch.randn(2, n, generator=gen, dtype=torch.float64)
    w = torch.rand(2, generator=gen, dtype=torch.float64)

    def fn(x):
        return 0.5 * x @ a @ x + b @ x + (w * torch.exp(u @ x)).sum()

    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    _, g = sf.value_and_grad(fn)(x0)
    d = -g * 10.0 ** float(torch.randint(-2, 2, (), generator=gen))
    return fn, x0, d, float(d @ a @ d)


def test_tight_curvature_agrees_with_scipy_within_the_acceptable_interval():
    # With c2 = 0.01 on a strictly convex ray the acceptable steps lie within
    # c2 |phi'(0)| / min phi'' of the exact minimizer; both searches must land there.
    c1, c2 = 1e-4, 0.01
    for seed in range(25):
        fn, x0, d, curvature = convex_problem(seed)
        _, state = run_search(wolfe(c1=c1, c2=c2), fn, x0, d)
        ours = float(state.step_size)
        theirs = scipy_search(fn, x0, d, c1, c2)
        assert not bool(state.search_failed) and theirs is not None, seed
        df0 = slope(fn, x0, d)
        hi = 1.0
        while phi_slope(fn, x0, d, hi) < 0:
            hi *= 2
        exact = scipy.optimize.brentq(
            lambda t, fn=fn, x0=x0, d=d: phi_slope(fn, x0, d, t), 0.0, hi, xtol=1e-14
        )
        radius = c2 * abs(df0) / curvature
        assert abs(ours - exact) <= radius * (1 + 1e-9), seed
        assert abs(theirs - exact) <= radius * (1 + 1e-9), seed
        assert abs(ours - theirs) <= 2 * radius * (1 + 1e-9), seed


# --- safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("initial_step", ["unit", 1e-3])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_values_shrink_the_step(bad, initial_step):
    def fn(x):
        q = (x - 1.0).pow(2).sum()
        return torch.where(x[0] < 0.3, q, torch.full_like(q, bad))

    x0 = torch.zeros(2, dtype=torch.float64)
    d = torch.tensor([1.0, 0.0], dtype=torch.float64)
    _, state = run_search(wolfe(initial_step=initial_step), fn, x0, d)
    alpha = float(state.step_size)
    assert not bool(state.search_failed)
    assert 0 < alpha < 0.3
    assert math.isfinite(float(state.next_value))
    # phi = (alpha - 1)^2 + 1: strong Wolfe with c2 = 0.9 holds on [0.1, 0.3)
    assert_strong_wolfe(fn, x0, d, alpha, 1e-4, 0.9)


def test_uphill_direction_gives_a_zero_step_and_the_flag():
    fn, x0, d = random_problem(1)
    value, grad = sf.value_and_grad(fn)(x0)
    for direction in (-d, torch.zeros_like(d), torch.full_like(d, math.inf)):
        updates, state = run_search(wolfe(), fn, x0, direction)
        assert bool(state.search_failed)
        assert torch.equal(updates, torch.zeros_like(x0))
        assert float(state.step_size) == 0.0
        assert torch.equal(state.next_value, value) and torch.equal(state.next_grad, grad)
        assert int(state.num_search_evals) == 0


def test_exhausted_search_returns_the_best_decreasing_point_or_zero():
    fn, x0, d = quadratic_ray(0.5)
    # one trial, short: sufficient decrease but too steep for c2 = 0.1
    _, state = run_search(wolfe(c2=0.1, initial_step=0.01, max_steps=1), fn, x0, d)
    assert bool(state.search_failed)
    assert float(state.step_size) == 0.01
    assert float(state.next_value) < phi(fn, x0, d, 0.0)
    # one trial, far too long: no decrease, zero step
    updates, state = run_search(wolfe(initial_step=100.0, max_steps=1), fn, x0, d)
    assert bool(state.search_failed)
    assert float(state.step_size) == 0.0
    assert torch.equal(updates, torch.zeros_like(x0))
    # a failed state still drives a later, successful update
    value, grad = sf.value_and_grad(fn)(x0)
    _, state = wolfe().update(d, state, x0, value=value, grad=grad, value_fn=fn)
    assert not bool(state.search_failed)


def test_published_step_hint_is_honoured():
    fn, x0, d = quadratic_ray(0.37)
    hint = torch.tensor(0.37, dtype=torch.float64)
    _, state = run_search(wolfe(), fn, x0, d, step_hint=hint)
    assert float(state.step_size) == 0.37
    assert int(state.num_search_evals) == 1


def test_extrapolation_grows_tenfold_when_the_cubic_has_no_minimizer():
    # phi(x) = -x - x^3 + x^4 (minimizer x = 1). The cubic matching phi and phi' at 0 and
    # a is -x - a^2 x^2 - (1 - 2a) x^3 (phi minus x^2 (x - a)^2): decreasing for x > 0, no
    # minimizer, so bracketing takes the largest growth (10 a), not the smallest (2 a).
    trials = []

    def fn(x):
        trials.append(float(x[0]))
        return -x[0] - x[0] ** 3 + x[0] ** 4

    x0, d = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    _, state = run_search(wolfe(initial_step=1e-3), fn, x0, d)
    searched = trials[1:]  # trials[0] is run_search's evaluation at x0
    assert searched[:2] == pytest.approx([1e-3, 1e-2], rel=1e-12)
    alpha = float(state.step_size)
    assert abs(-1 - 3 * alpha**2 + 4 * alpha**3) <= 0.9  # strong Wolfe, |phi'(0)| = 1
    assert not bool(state.search_failed)


def test_rounding_level_decrease_is_accepted_by_the_slope():
    # f = 1e8 + 1e-10 (x - 1)^2: the decrease from x = 0 (1e-10) is far below the rounding
    # of 1e8 (one ulp: 1.49e-8), and a one-ulp rounding error (modelled explicitly for
    # x > 0.5, without gradient) puts phi(1) above phi(0). The unit step meets
    # |phi'(1)| = 0 <= c2 |phi'(0)|: accepted in one trial (approximate Wolfe), where
    # sufficient decrease alone rejects it and zooms.
    ulp = float(np.spacing(1e8))

    def fn(x):
        noise = torch.where(x[0] > 0.5, ulp, 0.0)
        return 1e8 + 1e-10 * ((x[0] - 1.0) ** 2) + noise

    x0, d = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    _, state = run_search(wolfe(), fn, x0, d)
    assert float(state.step_size) == 1.0
    assert int(state.num_search_evals) == 1
    assert not bool(state.search_failed)

    # A decrease that the values resolve still has to satisfy sufficient decrease: the same
    # quadratic without the offset rejects a step past the minimizer with a higher value.
    def plain(x):
        return (x[0] - 1.0) ** 2

    _, state = run_search(wolfe(initial_step=2.5), plain, x0, d)
    assert float(state.step_size) != 2.5
    assert int(state.num_search_evals) >= 2


# --- driver, chains, purity, dtypes, errors ----------------------------------------------


def test_driver_reuses_the_accepted_value_and_gradient():
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = sf.minimize(rosenbrock, x0, sf.chain(sf.scale(-1.0), wolfe()), max_steps=40)
    rows = result.history[1:]
    assert result.num_grad_evals == 1 + sum(int(r["num_search_grads"]) for r in rows)
    assert result.num_value_evals == result.num_grad_evals


def test_steepest_descent_with_wolfe_converges_on_rosenbrock():
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = sf.minimize(
        rosenbrock, x0, sf.chain(sf.scale(-1.0), wolfe()), max_steps=3000, gtol=1e-6
    )
    assert result.converged, result.reason
    torch.testing.assert_close(result.params, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert all(r["search_failed"] == 0.0 for r in result.history[1:])


def test_lbfgs_with_wolfe_smoke():
    lbfgs = pytest.importorskip("soo_func.directions").lbfgs
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = sf.minimize(rosenbrock, x0, sf.chain(lbfgs(), wolfe()), max_steps=200, gtol=1e-8)
    assert result.converged, result.reason
    torch.testing.assert_close(result.params, torch.ones(2, dtype=torch.float64))
    ref = scipy.optimize.minimize(
        lambda x: float(rosenbrock(torch.as_tensor(x))), x0.numpy(), method="L-BFGS-B"
    )
    assert result.num_grad_evals <= 2 * ref.njev


def test_update_is_pure_on_a_pytree(dtype, device):
    def fn(p):
        return ((p["w"] - 1.0) ** 4).sum() + (p["b"] ** 2).sum() * 3.0 + p["w"].sum() * p["b"][0]

    params = {
        "w": torch.tensor([[0.5, 2.0], [1.5, -1.0]], dtype=dtype, device=device),
        "b": torch.tensor([1.0, -2.0], dtype=dtype, device=device),
    }
    value, grad = sf.value_and_grad(fn)(params)
    opt = sf.chain(sf.scale(-1.0), wolfe(initial_step="previous_decrease"))
    updates, state = assert_update_is_pure(opt, params, grad, steps=3, value=value, value_fn=fn)
    search_state = state.states[1]
    assert search_state.next_value.dtype == dtype
    assert search_state.step_size.dtype == dtype
    assert search_state.next_value.device.type == device.type
    assert updates["w"].dtype == dtype and updates["w"].device.type == device.type
    assert search_state.search_failed.device.type == device.type


def test_minimize_float32(device):
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float32, device=device)
    result = sf.minimize(rosenbrock, x0, sf.chain(sf.scale(-1.0), wolfe()), max_steps=100)
    assert result.params.dtype == torch.float32
    assert float(result.value) < 0.5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="c1"):
        wolfe(slope_rtol=0.5, curvature_rtol=0.4)
    with pytest.raises(ValueError, match="disagree"):
        wolfe(curvature_rtol=0.9, c2=0.1)
    with pytest.raises(ValueError, match="max_steps"):
        wolfe(max_steps=0)
    with pytest.raises(ValueError, match="initial_step"):
        wolfe(initial_step="previous")
    search = wolfe(c2=0.1)
    x = torch.ones(2)
    with pytest.raises(TypeError, match="value"):
        search.update(x, search.init(x), x, grad=x, value_fn=lambda p: p.sum())
    with pytest.raises(TypeError, match="state"):
        search.update(x, (), x, value=x.sum(), grad=x, value_fn=lambda p: p.sum())


def test_scipy_reference_is_not_trivially_equal():
    # guard for the agreement tests: on this ray scipy's first trial is rejected
    fn, x0, d = quadratic_ray(0.25)
    assert phi(fn, x0, d, 1.0) > phi(fn, x0, d, 0.0)
    assert np.isfinite(scipy_search(fn, x0, d, 1e-4, 0.1))


@pytest.mark.parametrize("make", [sf.wolfe, sf.armijo, sf.armijo_sync_free])
def test_bfloat16_params_keep_their_dtype(make):
    def fn(x):
        target = torch.tensor([1.0, -2.0], dtype=x.dtype)
        weight = torch.tensor([1.0, 3.0], dtype=x.dtype)
        return ((x - target) ** 2 * weight).sum()

    x0 = torch.zeros(2, dtype=torch.bfloat16)
    result = sf.minimize(fn, x0, sf.chain(sf.scale(-1.0), make()), max_steps=20, gtol=1e-2)
    assert result.params.dtype == torch.bfloat16 and result.value.dtype == torch.bfloat16
    assert float(result.value) < 0.05 * float(fn(x0))
