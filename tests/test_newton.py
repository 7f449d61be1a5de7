"""newton_krylov against a dense Hessian (torch.autograd.functional.hessian)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_update_is_pure
from test_krylov import no_host_sync

import soo_func as sf
from soo_func.directions.newton import newton_krylov

SOLVERS = ["cg", "cr", "minres"]


def make_problem(dtype, device="cpu"):
    """A smooth strictly convex function of a two-leaf pytree (non-quadratic)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    c = torch.randn(5, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    def value_fn(p):
        x = torch.cat([p["w"].reshape(-1), p["b"]])
        return torch.logsumexp(a @ x, 0) + 0.5 * (x * x).sum() + (c * x).sum() + (x**4).sum() / 4

    params = {
        "w": torch.full((2, 2), 0.3, dtype=dtype, device=device),
        "b": torch.tensor([-0.5], dtype=dtype, device=device),
    }
    return value_fn, params


def dense_newton(value_fn, params, damping):
    flat = sf.tree.ravel(params)

    def f(x):
        return value_fn(sf.tree.unravel(x, flat))

    x = flat.flat.double()
    h = torch.autograd.functional.hessian(lambda y: f(y.to(flat.flat.dtype)).double(), x)
    grad = torch.func.grad(lambda y: f(y.to(flat.flat.dtype)).double())(x)
    return -torch.linalg.solve(h + damping * torch.eye(len(x), dtype=h.dtype), grad)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("hvp_mode", ["forward-over-reverse", "reverse-over-reverse", "linearize"])
def test_direction_matches_dense_newton(solver, hvp_mode, dtype):
    value_fn, params = make_problem(dtype)
    damping = 0.25
    opt = newton_krylov(solver, damping=damping, forcing=1e-9 if dtype == torch.float64 else 1e-6,
                        hvp_mode=hvp_mode)  # fmt: skip
    value, grad = sf.value_and_grad(value_fn)(params)
    d, state = opt.update(grad, opt.init(params), params, value=value, grad=grad, value_fn=value_fn)
    expected = dense_newton(value_fn, params, damping)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(sf.tree.ravel(d).flat.double(), expected, rtol=tol, atol=tol)
    assert d["w"].dtype == dtype
    assert not bool(state.fallback)


@pytest.mark.parametrize("solver", SOLVERS)
def test_update_is_pure_and_counts_products(solver, dtype):
    value_fn, params = make_problem(dtype)
    counted = sf.CountedObjective(value_fn)
    value, grad = sf.value_and_grad(value_fn)(params)
    opt = newton_krylov(solver, max_iters=7, check_every=None)  # the host-sync-free path
    _, state = assert_update_is_pure(opt, params, grad, value=value, value_fn=counted)
    # 3 steps, each update called twice by the helper, 7 (+1 for CR) products per solve
    # plus the shared gradient pass of the default hvp_mode="linearize".
    # and the one product that scales a fallback -g (made every update: no host sync).
    per_solve = 7 + (solver == "cr") + 1 + 1
    assert int(state.num_hvps) == 3 * per_solve
    assert counted.num_hvp_evals == 6 * per_solve
    assert int(state.count) == 3


def test_default_solve_stops_at_its_tolerance_and_shares_the_published_operator():
    """The default (``check_every=1``) makes the products the solve needs, not
    ``max_iters``; no fallback product when the solve gives descent; and
    ``update_and_publish`` publishes the operator the solve linearized (one gradient
    pass per update, not two)."""
    value_fn, params = make_problem(torch.float64)
    counted = sf.CountedObjective(value_fn)
    _value, grad = sf.value_and_grad(value_fn)(params)
    opt = newton_krylov("cg", forcing=0.5)
    d, state, out = sf.update_and_publish(opt, grad, opt.init(params), params, value_fn=counted)
    iters = int(state.krylov_iters)
    assert not bool(state.fallback) and iters < 10  # max_iters = min(2 n, 100), n = 5
    assert int(state.num_hvps) == iters + 1 == counted.num_hvp_evals
    out["curvature"](d)
    assert counted.num_hvp_evals == iters + 2  # one more product, no second linearization


def test_check_every_gives_the_same_direction_with_fewer_products():
    value_fn, params = make_problem(torch.float64)
    _value, grad = sf.value_and_grad(value_fn)(params)
    outs = []
    for check_every in (None, 1):
        opt = newton_krylov("cg", forcing=1e-10, check_every=check_every)
        outs.append(opt.update(grad, opt.init(params), params, value_fn=value_fn))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
    assert int(outs[1][1].num_hvps) < int(outs[0][1].num_hvps) == 10 + 1 + 1
    assert int(outs[1][1].krylov_iters) == int(outs[0][1].krylov_iters)


def nonconvex(p):
    x = p["x"]
    return (x**4).sum() / 4 - (x**2).sum() + 0.1 * x.sum()


@pytest.mark.parametrize("solver", ["cg", "cr"])
def test_negative_curvature_at_first_iteration_falls_back_to_minus_grad(solver):
    params = {"x": torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)}  # H = 3x^2 - 2 < 0
    _value, grad = sf.value_and_grad(nonconvex)(params)
    opt = newton_krylov(solver)
    d, state = opt.update(grad, opt.init(params), params, value_fn=nonconvex)
    assert bool(state.negative_curvature) and bool(state.fallback)
    # -g scaled to |g|^2 / |g^T H g| (scipy's Newton-CG rule), H = diag(3 x^2 - 2).
    g = grad["x"]
    curvature = (g * (3 * params["x"] ** 2 - 2) * g).sum()
    torch.testing.assert_close(d["x"], -g * (g @ g) / curvature.abs())


def test_minres_direction_is_always_descent():
    params = {"x": torch.tensor([0.1, -0.2, 1.5], dtype=torch.float64)}  # indefinite Hessian
    _value, grad = sf.value_and_grad(nonconvex)(params)
    opt = newton_krylov("minres", forcing=1e-10)
    d, state = opt.update(grad, opt.init(params), params, value_fn=nonconvex)
    assert float(sf.tree.vdot(grad, d)) < 0
    assert bool(state.negative_curvature)


def test_truncated_cg_returns_the_iterate_before_negative_curvature():
    # Diagonal Hessian diag(2, 2, -1) at x=0 (f = x1^2 + x2^2 - x3^2/2 + <c, x>), CG from
    # b = -g: CG on the positive block first only when g has no component on the
    # negative eigenvector; then the solution of that block is returned.
    def f(p):
        x = p["x"]
        return x[0] ** 2 + x[1] ** 2 - 0.5 * x[2] ** 2 + x[0] - 2 * x[1] + 1e-3 * x[2]

    params = {"x": torch.zeros(3, dtype=torch.float64)}
    _value, grad = sf.value_and_grad(f)(params)
    opt = newton_krylov("cg", forcing=1e-12)
    d, state = opt.update(grad, opt.init(params), params, value_fn=f)
    assert bool(state.negative_curvature) and not bool(state.fallback)
    assert float(sf.tree.vdot(grad, d)) < 0


def test_forcing_terms_follow_eisenstat_walker():
    value_fn, params = make_problem(torch.float64)
    for forcing in ("eisenstat_walker_1", "eisenstat_walker_2", "nocedal_wright", 0.3):
        opt = newton_krylov("cg", forcing=forcing, check_every=1)
        state = opt.init(params)
        p = params
        norms, residuals, etas = [], [], []
        for _ in range(3):
            _value, grad = sf.value_and_grad(value_fn)(p)
            d, state = opt.update(grad, state, p, value_fn=value_fn)
            hd = sf.hvp(value_fn, p, d)
            norms.append(float(sf.tree.norm(grad)))
            residuals.append(float(sf.tree.norm(sf.tree.add(hd, grad))))
            etas.append(float(state.forcing_term))
            # The solve honours its forcing term.
            assert residuals[-1] <= etas[-1] * norms[-1] * (1 + 1e-9)
            p = sf.apply_updates(p, d)
        for k in (1, 2):
            if forcing == "eisenstat_walker_1":
                eta = abs(norms[k] - residuals[k - 1]) / norms[k - 1]
                floor = etas[k - 1] ** ((1 + math.sqrt(5)) / 2)
            elif forcing == "eisenstat_walker_2":
                eta = 0.9 * (norms[k] / norms[k - 1]) ** 2
                floor = 0.9 * etas[k - 1] ** 2
            elif forcing == "nocedal_wright":
                eta, floor = min(0.5, math.sqrt(norms[k])), 0.0
            else:
                eta, floor = 0.3, 0.0
            eta = max(eta, floor) if floor > 0.1 else eta
            assert etas[k] == pytest.approx(min(eta, 0.9), rel=1e-9)
        if isinstance(forcing, str) and forcing.startswith("eisenstat"):
            assert etas[0] == 0.5


def test_publishes_damped_curvature():
    value_fn, params = make_problem(torch.float64)
    opt = sf.chain(newton_krylov(damping=0.5))
    value, grad = sf.value_and_grad(value_fn)(params)
    _, state = opt.update(grad, opt.init(params), params, value=value, grad=grad, value_fn=value_fn)
    published = sf.publish(opt, state, params, value_fn=value_fn)
    v = sf.tree.ones_like(params)
    expected = sf.tree.axpy(0.5, v, sf.hvp(value_fn, params, v))
    torch.testing.assert_close(published["curvature"](v), expected)
    assert published["newton_krylov_iters"].dim() == 0


def test_minimize_converges_superlinearly_on_convex_problem():
    value_fn, params = make_problem(torch.float64)
    # gtol 1e-8: below that, Armijo's decrease test compares changes under f's rounding.
    res = sf.minimize(value_fn, params, sf.chain(newton_krylov(), sf.armijo()), gtol=1e-8)
    assert res.converged and res.num_steps <= 6
    norms = [row["grad_norm"] for row in res.history]
    # Eisenstat-Walker choice 2 (alpha = 2) gives q-order 2 locally; ask for 1.5.
    assert norms[-1] <= norms[-2] ** 1.5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="solver"):
        newton_krylov("gmres")
    with pytest.raises(ValueError, match="forcing"):
        newton_krylov(forcing="ew3")
    with pytest.raises(ValueError, match="forcing"):
        newton_krylov(forcing=1.5)
    with pytest.raises(ValueError, match="damping"):
        newton_krylov(damping=-1.0)
    with pytest.raises(ValueError, match="hvp_mode"):
        newton_krylov(hvp_mode="finite-differences")
    _value_fn, params = make_problem(torch.float64)
    opt = newton_krylov()
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(params, opt.init(params), params)


def test_newton_on_device(device, dtype):
    value_fn, params = make_problem(dtype, device)
    opt = newton_krylov()
    _value, grad = sf.value_and_grad(value_fn)(params)
    d, state = opt.update(grad, opt.init(params), params, value_fn=value_fn)
    assert d["w"].device.type == device.type and state.num_hvps.device.type == device.type


@pytest.mark.parametrize("mode", ["linearize", "forward-over-reverse", "reverse-over-reverse"])
def test_hvp_operator_matches_dense_hessian_and_counts(mode):
    value_fn, params = make_problem(torch.float64)
    flat = sf.tree.ravel(params)
    h = torch.autograd.functional.hessian(lambda x: value_fn(sf.tree.unravel(x, flat)), flat.flat)
    counted = sf.CountedObjective(value_fn)
    op = sf.oracles.hvp_operator(counted, params, mode=mode)
    assert counted.num_hvp_evals == 0  # lazy: nothing runs before the first product
    for seed in range(3):
        v = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        hv = sf.tree.ravel(op(sf.tree.unravel(v, flat))).flat
        torch.testing.assert_close(hv, h @ v, rtol=1e-12, atol=1e-12)
    assert counted.num_hvp_evals == 3 + (mode == "linearize")
    assert counted.num_value_evals == 0 and counted.num_grad_evals == 0
    with pytest.raises(ValueError, match="mode"):
        sf.oracles.hvp_operator(value_fn, params, mode="finite-differences")


def test_hvp_operator_linear_function_and_inside_vmap():
    def linear(p):
        return (3.0 * p["x"]).sum()

    params = {"x": torch.ones(3, dtype=torch.float64)}
    out = sf.oracles.hvp_operator(linear, params)(params)  # gradient has no graph: H = 0
    torch.testing.assert_close(out["x"], torch.zeros(3, dtype=torch.float64))

    def cubic(p):
        return (p["x"] ** 3).sum() + p["x"][0] * p["x"][1]

    x = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    h = torch.autograd.functional.hessian(lambda y: cubic({"x": y}), x)
    vs = torch.eye(3, dtype=torch.float64)
    # Inside a torch.func transform the functorch linearization is used.
    batched = torch.func.vmap(lambda u: sf.oracles.hvp_operator(cubic, {"x": x})({"x": u})["x"])(vs)
    torch.testing.assert_close(batched, h)
    assert x.grad is None and not x.requires_grad


@pytest.mark.parametrize("solver", SOLVERS)
def test_update_makes_no_host_sync(solver):
    value_fn, params = make_problem(torch.float64)
    value, grad = sf.value_and_grad(value_fn)(params)
    opt = newton_krylov(solver, forcing="eisenstat_walker_1", check_every=None)
    state = opt.init(params)
    with no_host_sync():
        for _ in range(2):
            d, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
            params = sf.apply_updates(params, d)


def test_published_curvature_drives_a_trust_region():
    def rosen(p):
        x = p["x"]
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    params = {"x": torch.tensor([-1.2, 1.0, -1.2, 1.0], dtype=torch.float64)}
    res = sf.minimize(rosen, params, sf.chain(newton_krylov(), sf.trust_region()), gtol=1e-8)
    assert res.converged, res.reason
    torch.testing.assert_close(
        res.params["x"], torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0
    )
