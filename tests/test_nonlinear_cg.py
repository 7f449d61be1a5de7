"""Nonlinear CG: n-step termination on quadratics with exact searches, formulas, guards."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_update_is_pure
from test_krylov import no_host_sync

import soo_func as sf
from soo_func.directions.nonlinear_cg import BETAS, nonlinear_cg


def quadratic(n: int, dtype, seed: int = 0, cond: float = 50.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (
        q * torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    ) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    a, b = a.to(dtype), b.to(dtype)

    def value_fn(p):
        x = torch.cat([p["u"], p["v"].reshape(-1)])
        return 0.5 * x @ a @ x - b @ x

    def split(x):
        return {"u": x[:3], "v": x[3:].reshape(-1, 1)}

    return value_fn, a, b, split


def flat(p):
    return sf.tree.ravel(p).flat


@pytest.mark.parametrize("beta", BETAS)
def test_exact_line_search_reaches_quadratic_minimizer_in_n_steps(beta, dtype):
    n = 8
    value_fn, a, b, split = quadratic(n, dtype)
    params = split(torch.zeros(n, dtype=dtype))
    opt = nonlinear_cg(beta)
    state = opt.init(params)
    for _ in range(n):
        _, grad = sf.value_and_grad(value_fn)(params)
        d, state = opt.update(grad, state, params)
        g, dv = flat(grad), flat(d)
        alpha = -(g @ dv) / (dv @ a @ dv)  # exact minimizer along d (closed form)
        params = sf.apply_updates(params, sf.tree.scale(alpha, d))
    x_star = torch.linalg.solve(a.double(), b.double())
    # Float64: n-step termination to rounding. Float32: rounding breaks conjugacy, and the
    # loss grows with cond(A) = 50 (measured 1e-4 to 5e-3 relative error, the largest for
    # Hager-Zhang, whose extra term amplifies the inexact g_k^T d_{k-1} = 0), so only
    # convergence to about 1% is checked there.
    tol = 1e-9 if dtype == torch.float64 else 1e-2
    assert flat(params).dtype == dtype
    torch.testing.assert_close(flat(params).double(), x_star, rtol=0, atol=tol * x_star.norm())
    # Conjugacy held: no restart was needed after the first step.
    assert not bool(state.restarted)


def betas_dense(g, g_prev, d_prev):
    y = g - g_prev
    hs = (g @ y) / (d_prev @ y)
    dy = (g @ g) / (d_prev @ y)
    hz = (y - 2 * d_prev * (y @ y) / (d_prev @ y)) @ g / (d_prev @ y)
    hz = max(float(hz), float(-1 / (d_prev.norm() * min(0.01, float(g_prev.norm())))))
    pr = (g @ y) / (g_prev @ g_prev)
    return {
        "fletcher_reeves": float((g @ g) / (g_prev @ g_prev)),
        "polak_ribiere": float(pr),
        "polak_ribiere_plus": max(0.0, float(pr)),
        "hestenes_stiefel": float(hs),
        "dai_yuan": float(dy),
        "hager_zhang": hz,
        "hs_dy": max(0.0, min(float(hs), float(dy))),
    }


@pytest.mark.parametrize("beta", BETAS)
def test_beta_formulas_on_a_nonquadratic_function(beta):
    def f(p):
        x = p["x"]
        return (x**4).sum() + (x[:-1] * x[1:]).sum() + torch.exp(x).sum()

    params = {"x": torch.tensor([0.3, -0.7, 0.2, 0.9], dtype=torch.float64)}
    opt = nonlinear_cg(beta, restart_threshold=float("inf"))
    state = opt.init(params)
    _, g0 = sf.value_and_grad(f)(params)
    d0, state = opt.update(g0, state, params)
    torch.testing.assert_close(d0["x"], -g0["x"])
    params = sf.apply_updates(params, sf.tree.scale(0.05, d0))
    _, g1 = sf.value_and_grad(f)(params)
    d1, state = opt.update(g1, state, params)
    expected = betas_dense(g1["x"], g0["x"], d0["x"])[beta]
    if expected != 0 and float(g1["x"] @ (-g1["x"] + expected * d0["x"])) < 0:
        assert float(state.beta) == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(d1["x"], -g1["x"] + expected * d0["x"])
    else:
        torch.testing.assert_close(d1["x"], -g1["x"])
    # N&W eq. 3.60 step hint: alpha_0 g_0^T d_0 / g_1^T d_1 with alpha_0 = 0.05.
    hint = 0.05 * float(g0["x"] @ d0["x"]) / float(g1["x"] @ d1["x"])
    assert float(state.step_hint) == pytest.approx(hint, rel=1e-12)
    assert float(sf.publish(opt, state, params)["step_hint"]) == pytest.approx(hint, rel=1e-12)


def test_powell_restart_and_periodic_restart():
    params = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    g0 = {"x": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    g1 = {"x": torch.tensor([1.0, 1.0], dtype=torch.float64)}  # g1.g0 = 1 >= 0.2 * 2
    opt = nonlinear_cg("fletcher_reeves")
    state = opt.init(params)
    _, state = opt.update(g0, state, params)
    d, state = opt.update(g1, state, params)
    assert bool(state.restarted)
    torch.testing.assert_close(d["x"], -g1["x"])
    g2 = {"x": torch.tensor([-0.1, 0.1], dtype=torch.float64)}  # orthogonal to g1
    d, state = opt.update(g2, state, params)
    assert not bool(state.restarted)
    g3 = {"x": torch.tensor([0.2, 0.2], dtype=torch.float64)}  # orthogonal to g2
    d, state = opt.update(g3, state, params)  # n = 2 steps since the restart: restart
    assert bool(state.restarted)
    torch.testing.assert_close(d["x"], -g3["x"])
    opt3 = nonlinear_cg("fletcher_reeves", restart_every=3)
    s = opt3.init(params)
    for g in (g0, g1, g2):
        d, s = opt3.update(g, s, params)
    assert not bool(s.restarted)
    torch.testing.assert_close(
        d["x"], -g2["x"] + 0.01 * torch.tensor([-1.0, -1.0], dtype=torch.float64)
    )


def test_descent_guard_falls_back_to_minus_grad():
    params = {"x": torch.zeros(2, dtype=torch.float64)}
    opt = nonlinear_cg("polak_ribiere", restart_threshold=float("inf"))
    state = opt.init(params)
    _, state = opt.update({"x": torch.tensor([1.0, 0.0], dtype=torch.float64)}, state, params)
    # d_prev = (-1, 0); g = (-2, 0): y = (-3, 0), PR = g^T y / |g_prev|^2 = 6, and
    # -g + 6 d_prev = (-4, 0) has g^T d = 8 > 0: not a descent direction.
    g = {"x": torch.tensor([-2.0, 0.0], dtype=torch.float64)}
    d, state = opt.update(g, state, params)
    assert float(sf.tree.vdot(g, d)) < 0
    assert bool(state.restarted)
    torch.testing.assert_close(d["x"], -g["x"])


@pytest.mark.parametrize("beta", ["polak_ribiere", "hager_zhang"])
def test_update_is_pure(beta, dtype):
    value_fn, _a, _b, split = quadratic(6, dtype)
    params = split(torch.ones(6, dtype=dtype))
    value, grad = sf.value_and_grad(value_fn)(params)
    d, state = assert_update_is_pure(
        nonlinear_cg(beta), params, grad, value=value, value_fn=value_fn
    )
    assert d["u"].dtype == dtype and state.step_hint.dtype == dtype


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="beta"):
        nonlinear_cg("conjugate_descent_xyz")
    with pytest.raises(ValueError, match="restart_every"):
        nonlinear_cg(restart_every=0)
    with pytest.raises(ValueError, match="restart_threshold"):
        nonlinear_cg(restart_threshold=0.0)


def test_nonlinear_cg_on_device(device):
    _value_fn, _a, _b, split = quadratic(6, torch.float64)
    params = sf.tree.map_leaves(lambda t: t.to(device), split(torch.ones(6, dtype=torch.float64)))
    opt = nonlinear_cg()
    grad = sf.tree.map_leaves(torch.ones_like, params)
    d, state = opt.update(grad, opt.init(params), params)
    assert d["u"].device.type == device.type and state.count.device.type == device.type


def test_minimize_with_wolfe_on_rosenbrock():
    def rosen(p):
        x = p["x"]
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    params = {"x": torch.tensor([-1.2, 1.0, -1.2, 1.0], dtype=torch.float64)}
    for beta in ("polak_ribiere_plus", "hestenes_stiefel", "hs_dy", "hager_zhang"):
        res = sf.minimize(rosen, params, sf.chain(nonlinear_cg(beta), sf.wolfe(c2=0.1)),
                          gtol=1e-6, max_steps=2000)  # fmt: skip
        assert res.converged, (beta, res.reason)
        torch.testing.assert_close(
            res.params["x"], torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("beta", BETAS)
def test_update_makes_no_host_sync(beta):
    value_fn, _a, _b, split = quadratic(6, torch.float64)
    params = split(torch.ones(6, dtype=torch.float64))
    opt = nonlinear_cg(beta)
    state = opt.init(params)
    for _ in range(3):
        _, grad = sf.value_and_grad(value_fn)(params)
        with no_host_sync():
            d, state = opt.update(grad, state, params)
            published = sf.publish(opt, state, params)
        params = sf.apply_updates(params, sf.tree.scale(0.1, d))
    assert published["step_hint"].dim() == 0
