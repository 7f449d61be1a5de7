"""Backtracking (Armijo) search: the inequality on the numbers, interpolation, safety, reuse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_update_is_pure

import soo_func as sf
from soo_func.searches import armijo, armijo_sync_free
from soo_func.searches.line import (
    cubic_minimizer,
    cubic_minimizer_from_values,
    quadratic_minimizer,
)

# --- random smooth functions with a descent direction (shared with test_wolfe) ----------


def random_problem(seed: int, n: int = 4, dtype=torch.float64):
    """A smooth function bounded below (convex quadratic + quartic + exp + sin terms), a
    point and a descent direction (steepest descent or a random one turned downhill)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    m = rand(n, n)
    a = m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = rand(n)
    u = 0.5 * rand(2, n)
    w = torch.rand(2, generator=gen, dtype=torch.float64)
    v = rand(2, n)
    s = rand(2)
    quartic = float(torch.rand((), generator=gen, dtype=torch.float64)) * (seed % 3 == 0)
    scale_x = 10.0 ** float(torch.randint(-1, 2, (), generator=gen))

    def fn(x):
        x64 = x.to(torch.float64)
        out = 0.5 * x64 @ a @ x64 + b @ x64 + (w * torch.exp(u @ x64)).sum()
        out = out + (s * torch.sin(v @ x64)).sum() + quartic * (x64 @ x64) ** 2
        return out.to(x.dtype)

    x0 = (scale_x * rand(n)).to(dtype)
    _, g = sf.value_and_grad(fn)(x0)
    if seed % 2 == 0:
        d = -g
    else:
        d = rand(n).to(dtype)
        if float(d @ g) > 0:
            d = -d
    d = d * 10.0 ** float(torch.randint(-2, 2, (), generator=gen))
    return fn, x0, d


def phi(fn, x0, d, alpha):
    """``f(x0 + alpha d)`` recomputed in float64, independently of the search."""
    return float(fn(x0.double() + float(alpha) * d.double()))


def slope(fn, x0, d):
    g = torch.func.grad(lambda x: fn(x))(x0.double())
    return float(g @ d.double())


def run_search(search, fn, x0, d, **extra):
    value, grad = sf.value_and_grad(fn)(x0)
    state = search.init(x0)
    updates, state = search.update(d, state, x0, value=value, grad=grad, value_fn=fn, **extra)
    return updates, state


# --- the Armijo inequality -------------------------------------------------------------


@pytest.mark.parametrize("c1", [1e-3, 0.4])
@pytest.mark.parametrize("initial_step", ["unit", 10.0, "previous_decrease"])
def test_accepted_steps_satisfy_armijo(initial_step, c1):
    search = armijo(slope_rtol=c1, initial_step=initial_step)
    for seed in range(40):
        fn, x0, d = random_problem(seed)
        updates, state = run_search(search, fn, x0, d)
        alpha = float(state.step_size)
        assert not bool(state.search_failed), seed
        assert alpha > 0
        torch.testing.assert_close(updates, alpha * d, rtol=0, atol=0)
        f0, df0 = phi(fn, x0, d, 0.0), slope(fn, x0, d)
        assert df0 < 0
        assert phi(fn, x0, d, alpha) <= f0 + c1 * alpha * df0 + 1e-12 * abs(f0), seed
        # the published value and gradient are those at the accepted point
        assert float(state.next_value) == pytest.approx(phi(fn, x0, d, alpha), rel=1e-12)
        _, g_new = sf.value_and_grad(fn)(x0 + updates)
        torch.testing.assert_close(state.next_grad, g_new)


def test_initial_step_is_kept_when_it_satisfies_armijo():
    for seed in range(20):
        fn, x0, d = random_problem(seed)
        f0, df0 = phi(fn, x0, d, 0.0), slope(fn, x0, d)
        alpha0 = 1e-3 / max(1.0, float(d.norm()))
        if phi(fn, x0, d, alpha0) > f0 + 1e-4 * alpha0 * df0:
            continue
        _, state = run_search(armijo(initial_step=alpha0), fn, x0, d)
        assert float(state.step_size) == alpha0
        assert int(state.num_search_evals) == 1 and int(state.num_search_grads) == 1


def test_a_rejected_unit_step_on_a_quadratic_lands_on_its_exact_minimizer():
    # phi(alpha) = 0.5 alpha^2 d'Ad - alpha g'g: the quadratic interpolant is phi itself.
    a = torch.diag(torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64))
    x0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)

    def fn(x):
        return 0.5 * x @ a @ x

    g = a @ x0
    d = -g
    exact = float(g @ g / (d @ a @ d))
    assert 0.1 < exact < 0.5  # inside the safeguard [0.1, 0.5] of a unit first trial
    _, state = run_search(armijo(), fn, x0, d)
    assert float(state.step_size) == pytest.approx(exact, rel=1e-12)
    assert int(state.num_search_evals) == 3  # unit trial, the minimizer, its gradient
    assert int(state.num_search_grads) == 2


# --- interpolation formulas against dense polynomial fits --------------------------------


def _dense_cubic_min(rows, rhs):
    coef = np.linalg.solve(np.array(rows, dtype=float), np.array(rhs, dtype=float))
    c3, c2, c1, _ = coef
    roots = np.roots([3 * c3, 2 * c2, c1])
    minima = [r.real for r in roots if abs(r.imag) < 1e-12 and 6 * c3 * r.real + 2 * c2 > 0]
    return minima[0] if minima else math.nan


def test_interpolation_formulas_match_dense_fits():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        a, b = sorted(rng.uniform(-2, 3, size=2))
        c = rng.normal(size=4)

        def p(x, c=c):
            return c[0] * x**3 + c[1] * x**2 + c[2] * x + c[3]

        def dp(x, c=c):
            return 3 * c[0] * x**2 + 2 * c[1] * x + c[2]

        ref = _dense_cubic_min(
            [
                [a**3, a**2, a, 1],
                [b**3, b**2, b, 1],
                [3 * a**2, 2 * a, 1, 0],
                [3 * b**2, 2 * b, 1, 0],
            ],
            [p(a), p(b), dp(a), dp(b)],
        )
        got = cubic_minimizer(a, p(a), dp(a), b, p(b), dp(b))
        if math.isnan(ref):
            assert math.isnan(got)
            continue
        assert got == pytest.approx(ref, rel=1e-7, abs=1e-7)
        a0, a1 = rng.uniform(0.1, 3, size=2)
        got_v = cubic_minimizer_from_values(p(0), dp(0), a0, p(a0), a1, p(a1))
        assert got_v == pytest.approx(ref, rel=1e-6, abs=1e-6)
        checked += 1
    assert checked > 50
    # quadratic: exact on a parabola, NaN without positive curvature
    assert quadratic_minimizer(1.0, 4.0, -4.0, 3.0, 4.0) == pytest.approx(2.0)
    assert math.isnan(quadratic_minimizer(0.0, 0.0, -1.0, 1.0, -2.0))


# --- safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_trial_values_shrink_the_step(bad):
    def fn(x):
        # finite only for x[0] < 0.3 (so along d = e0 from 0, for alpha < 0.3)
        q = (x - 1.0).pow(2).sum()
        return torch.where(x[0] < 0.3, q, torch.full_like(q, bad))

    x0 = torch.zeros(2, dtype=torch.float64)
    d = torch.tensor([1.0, 0.0], dtype=torch.float64)
    _, state = run_search(armijo(), fn, x0, d)
    alpha = float(state.step_size)
    assert not bool(state.search_failed)
    assert 0 < alpha < 0.3
    assert math.isfinite(float(state.next_value))
    assert float(state.next_value) <= 2.0 + 1e-4 * alpha * (-2.0)


def test_uphill_direction_gives_a_zero_step_and_the_flag():
    fn, x0, d = random_problem(0)
    value, grad = sf.value_and_grad(fn)(x0)
    for direction in (-d, torch.zeros_like(d), torch.full_like(d, math.nan)):
        updates, state = run_search(armijo(), fn, x0, direction)
        assert bool(state.search_failed)
        assert torch.equal(updates, torch.zeros_like(x0))
        assert float(state.step_size) == 0.0
        assert torch.equal(state.next_value, value) and torch.equal(state.next_grad, grad)
        assert int(state.num_search_evals) == 0


def test_no_sufficient_decrease_returns_best_decreasing_point_or_zero():
    def fn(x):
        return (x**2).sum()

    x0 = torch.tensor([1.0], dtype=torch.float64)
    d = torch.tensor([-1.0], dtype=torch.float64)
    # alpha = 1.9: phi = 0.81 < 1 but not below 1 - 0.9 * 1.9 * 2: one trial allowed
    updates, state = run_search(armijo(slope_rtol=0.9, initial_step=1.9, max_steps=1), fn, x0, d)
    assert bool(state.search_failed)
    assert float(state.step_size) == 1.9
    assert float(state.next_value) == pytest.approx(0.81)
    # every trial uphill (a huge step, two trials): a zero step
    updates, state = run_search(armijo(initial_step=1e6, max_steps=2), fn, x0, d)
    assert bool(state.search_failed)
    assert float(state.step_size) == 0.0
    assert torch.equal(updates, torch.zeros_like(x0))
    assert float(state.next_value) == 1.0


# --- initial steps -------------------------------------------------------------------------


def test_published_step_hint_is_honoured():
    fn, x0, d = random_problem(2)
    hint = 1e-4 / float(d.norm())
    _, state = run_search(armijo(), fn, x0, d, step_hint=torch.tensor(hint, dtype=torch.float64))
    assert float(state.step_size) == pytest.approx(hint, rel=1e-15)


def test_previous_decrease_initial_step_follows_eq_3_60():
    def fn(x):
        return 0.5 * (x**2).sum()

    search = armijo(initial_step="previous_decrease", slope_rtol=1e-8)
    x0 = torch.tensor([3.0, 4.0], dtype=torch.float64)
    value, grad = sf.value_and_grad(fn)(x0)
    state = search.init(x0)
    # first update: alpha0 = min(1, ||g|| / |phi'(0)|) = 1 / ||g|| for d = -g
    updates, state = search.update(-grad, state, x0, value=value, grad=grad, value_fn=fn)
    assert float(state.step_size) == pytest.approx(1 / 5.0)
    # second update: alpha0 = min(1, 2 (f_k - f_{k-1}) / phi'(0))
    x1 = x0 + updates
    value1, grad1 = sf.value_and_grad(fn)(x1)
    _, state = search.update(-grad1, state, x1, value=value1, grad=grad1, value_fn=fn)
    expected = min(1.0, 2 * float(value1 - value) / float(-(grad1 @ grad1)))
    assert float(state.step_size) == pytest.approx(expected, rel=1e-12)


# --- driver reuse, purity, dtypes, devices, errors ----------------------------------------


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def test_driver_reuses_the_accepted_value_and_gradient():
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = sf.minimize(rosenbrock, x0, sf.chain(sf.scale(-1.0), armijo()), max_steps=30)
    rows = result.history[1:]
    assert len(rows) == result.num_steps == 30
    assert result.num_grad_evals == 1 + sum(int(r["num_search_grads"]) for r in rows)
    assert result.num_value_evals == 1 + sum(int(r["num_search_evals"]) for r in rows)
    assert result.value < rosenbrock(x0)
    # steepest descent's unit first trials are rejected: after the first step no gradient is
    # spent on them, one per step at the accepted point
    assert [int(r["num_search_grads"]) for r in rows[1:]] == [1] * (len(rows) - 1)
    assert all(b["value"] < a["value"] for a, b in zip(result.history, rows, strict=False))


def test_update_is_pure_on_a_pytree(dtype, device):
    def fn(p):
        return ((p["w"] - 1.0) ** 4).sum() + (p["b"] ** 2).sum() * 3.0

    params = {
        "w": torch.tensor([[0.5, 2.0], [1.5, -1.0]], dtype=dtype, device=device),
        "b": torch.tensor([1.0, -2.0], dtype=dtype, device=device),
    }
    value, grad = sf.value_and_grad(fn)(params)
    opt = sf.chain(sf.scale(-1.0), armijo())
    updates, state = assert_update_is_pure(opt, params, grad, steps=3, value=value, value_fn=fn)
    search_state = state.states[1]
    assert search_state.next_value.dtype == dtype
    assert search_state.step_size.dtype == dtype
    assert search_state.next_value.device.type == device.type
    assert updates["w"].dtype == dtype and updates["w"].device.type == device.type
    assert int(search_state.num_syncs) >= 6


def test_minimize_float32(device):
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float32, device=device)
    result = sf.minimize(rosenbrock, x0, sf.chain(sf.scale(-1.0), armijo()), max_steps=50)
    assert result.params.dtype == torch.float32
    assert float(result.value) < 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="slope_rtol"):
        armijo(slope_rtol=1.5)
    with pytest.raises(ValueError, match="min_shrink"):
        armijo(min_shrink=0.6, max_shrink=0.5)
    with pytest.raises(ValueError, match="max_steps"):
        armijo(max_steps=0)
    with pytest.raises(ValueError, match="initial_step"):
        armijo(initial_step="newton")
    with pytest.raises(ValueError, match="initial_step"):
        armijo(initial_step=-1.0)
    with pytest.raises(ValueError, match="disagree"):
        armijo(slope_rtol=1e-4, c1=1e-3)
    assert armijo(c1=0.3) is not None
    search = armijo()
    x = torch.ones(2)
    with pytest.raises(TypeError, match="value_fn"):
        search.update(x, search.init(x), x, value=torch.tensor(1.0), grad=x)


def test_lbfgs_with_armijo_smoke():
    lbfgs = pytest.importorskip("soo_func.directions").lbfgs
    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    result = sf.minimize(rosenbrock, x0, sf.chain(lbfgs(), armijo()), max_steps=300, gtol=1e-8)
    assert result.converged, result.reason
    torch.testing.assert_close(result.params, torch.ones(2, dtype=torch.float64))
    # quasi-Newton unit steps are mostly accepted at once: few wasted evaluations
    assert result.num_grad_evals <= 1.5 * result.num_steps


# --- the sync-free variant ------------------------------------------------------------------


def test_sync_free_update_reads_nothing_on_the_host():
    fn, x0, d = random_problem(3)
    value, grad = sf.value_and_grad(fn)(x0)
    search = armijo_sync_free(initial_step="previous_decrease")
    state = search.init(x0)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, _refuse_sync)
        updates, state = search.update(
            d, state, x0, value=value, grad=grad, value_fn=fn, step_hint=torch.tensor(0.5)
        )
    assert int(state.num_syncs) == 0
    assert not bool(state.search_failed)
    torch.testing.assert_close(updates, float(state.step_size) * d, rtol=0, atol=0)
    # and the host variant does read (the check above is not vacuous)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(AssertionError, match="sync"):
        patch.setattr(torch.Tensor, "tolist", _refuse_sync)
        armijo().update(d, armijo().init(x0), x0, value=value, grad=grad, value_fn=fn)


def _refuse_sync(*args, **kwargs):
    raise AssertionError("host synchronisation in a sync-free update")


@pytest.mark.parametrize("c1", [1e-4, 0.4])
def test_sync_free_steps_satisfy_armijo_and_match_the_host_search(c1):
    matched = 0
    for seed in range(40):
        fn, x0, d = random_problem(seed)
        updates, state = run_search(armijo_sync_free(slope_rtol=c1, max_steps=30), fn, x0, d)
        alpha = float(state.step_size)
        assert not bool(state.search_failed), seed
        torch.testing.assert_close(updates, alpha * d, rtol=0, atol=0)
        f0, df0 = phi(fn, x0, d, 0.0), slope(fn, x0, d)
        assert phi(fn, x0, d, alpha) <= f0 + c1 * alpha * df0 + 1e-12 * abs(f0), seed
        assert float(state.next_value) == pytest.approx(phi(fn, x0, d, alpha), rel=1e-12)
        _, host = run_search(armijo(slope_rtol=c1), fn, x0, d)
        evals, grads = int(host.num_search_evals), int(host.num_search_grads)
        if evals == 1 or (evals == 3 and grads == 2):  # host accepted trial 1 or 2
            assert alpha == pytest.approx(float(host.step_size), rel=1e-12), seed
            matched += 1
    assert matched > 10


def test_sync_free_failures_give_a_zero_step():
    fn, x0, d = random_problem(0)
    value, grad = sf.value_and_grad(fn)(x0)
    for direction, kwargs in ((-d, {}), (d, {"initial_step": 1e9, "max_steps": 2})):
        updates, state = run_search(armijo_sync_free(**kwargs), fn, x0, direction)
        assert bool(state.search_failed)
        assert torch.equal(updates, torch.zeros_like(x0))
        assert torch.equal(state.next_value, value) and torch.equal(state.next_grad, grad)


def test_sync_free_in_the_driver_is_pure_and_counted(dtype, device):
    x0 = torch.tensor([-1.2, 1.0], dtype=dtype, device=device)
    opt = sf.chain(sf.scale(-1.0), armijo_sync_free(max_steps=6))
    value, grad = sf.value_and_grad(rosenbrock)(x0)
    assert_update_is_pure(opt, x0, grad, steps=3, value=value, value_fn=rosenbrock)
    result = sf.minimize(rosenbrock, x0, opt, max_steps=20)
    assert result.num_grad_evals == 1 + result.num_steps
    assert result.num_value_evals == 1 + 7 * result.num_steps
    assert result.params.dtype == dtype and float(result.value) < float(value)
