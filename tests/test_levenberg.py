"""Levenberg and Levenberg-Marquardt: steps against dense formulas, damping sequences
asserted on the numbers, rejection, purity, dtypes and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_update_is_pure

import soo_func as sf
from soo_func.searches.acceptance import gain_ratio
from soo_func.searches.damping import multiply_update, nielsen_update
from soo_func.searches.jacobian_cache import function_token
from soo_func.searches.levenberg import levenberg, levenberg_marquardt

T = torch.tensor


def _exp_fit():
    """A small nonlinear fit r_i = a exp(b t_i) - y_i (exact Jacobian known)."""
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    y = 2.0 * torch.exp(-1.3 * t) + 0.01 * torch.sin(7 * t)

    def residual_fn(x):
        return x[0] * torch.exp(x[1] * t) - y

    def jacobian(x):
        e = torch.exp(x[1] * t)
        return torch.stack([e, x[0] * t * e], dim=1)

    return residual_fn, jacobian


def _extras(residual_fn, x):
    def value_fn(p):
        return 0.5 * (residual_fn(p) ** 2).sum()

    value, grad = sf.value_and_grad(value_fn)(x)
    return {"value": value, "grad": grad, "value_fn": value_fn, "residual_fn": residual_fn}


def test_nielsen_rule_on_numbers():
    lam, nu = T(1.0), T(2.0)
    accepted = T(True)
    out = nielsen_update(lam, nu, T(1.0), accepted)  # 1 - (2 - 1)^3 = 0 -> 1/3
    assert torch.allclose(out.damping, T(1 / 3)) and out.nu == 2
    out = nielsen_update(lam, T(8.0), T(0.5), accepted)  # factor 1, nu reset to 2
    assert out.damping == 1.0 and out.nu == 2
    out = nielsen_update(lam, nu, T(0.75), accepted)  # 1 - 0.5^3 = 0.875
    assert torch.allclose(out.damping, T(0.875))
    out = nielsen_update(lam, T(4.0), T(-torch.inf), T(False))  # rejected: lam nu, 2 nu
    assert out.damping == 4.0 and out.nu == 8.0


def test_multiply_rule_on_numbers():
    out = multiply_update(T(1.0), T(2.0), T(True), increase_factor=5.0, decrease_factor=3.0)
    assert torch.allclose(out.damping, T(1 / 3))
    out = multiply_update(T(1.0), T(2.0), T(False), increase_factor=5.0, decrease_factor=3.0)
    assert out.damping == 5.0


def test_gain_ratio_rejects_bad_predictions():
    assert gain_ratio(T(1.0), T(2.0)) == 0.5
    assert gain_ratio(T(1.0), T(0.0)) == -torch.inf
    assert gain_ratio(T(torch.nan), T(1.0)) == -torch.inf
    assert gain_ratio(T(1.0), T(-1.0)) == -torch.inf


@pytest.mark.parametrize("marquardt", [False, True], ids=["levenberg", "marquardt"])
@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_steps_ratios_and_damping_follow_the_dense_formulas(marquardt, solver):
    """Three updates; each step, ratio and damping recomputed with numpy."""
    if solver == "cg":
        pytest.importorskip("soo_func.krylov")
    residual_fn, jacobian = _exp_fit()
    tau = 1e-2
    make = levenberg_marquardt if marquardt else levenberg
    opt = make(tau=tau, solver=solver, cg_rtol=1e-12, damping_rule="nielsen")
    x = T([1.0, 0.5], dtype=torch.float64)
    state = opt.init(x)
    lam, nu, damping_diag = None, 2.0, np.zeros(2)
    for _ in range(3):
        extra = _extras(residual_fn, x)
        J, r = jacobian(x).numpy(), residual_fn(x).numpy()
        JtJ, g = J.T @ J, J.T @ r
        damping_diag = np.maximum(damping_diag, np.diag(JtJ)) if marquardt else np.ones(2)
        if lam is None:
            if marquardt:
                lam = tau
            elif solver == "dense":
                lam = tau * np.diag(JtJ).max()
            else:  # matrix-free: a Rayleigh quotient of J^T J along g
                lam = tau * (g @ JtJ @ g) / (g @ g)
        d = np.linalg.solve(JtJ + lam * np.diag(damping_diag), -g)
        predicted = -(g @ d) - 0.5 * d @ JtJ @ d
        actual = 0.5 * (r @ r) - 0.5 * (residual_fn(x + torch.from_numpy(d)).numpy() ** 2).sum()
        rho = actual / predicted
        updates, state = opt.update(extra["grad"], state, x, **extra)
        np.testing.assert_allclose(float(state.ratio), rho, rtol=1e-6)
        if rho > 1e-4:
            np.testing.assert_allclose(updates.numpy(), d, rtol=1e-7, atol=1e-12)
            lam, nu = lam * max(1 / 3, 1 - (2 * rho - 1) ** 3), 2.0
        else:
            assert torch.equal(updates, torch.zeros_like(x))
            lam, nu = lam * nu, 2 * nu
        np.testing.assert_allclose(float(state.damping), lam, rtol=1e-9)
        assert float(state.nu) == nu
        x = x + updates


def test_linear_least_squares_exact_model_gives_ratio_one():
    torch.manual_seed(0)
    A = torch.randn(8, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)

    def residual_fn(x):
        return A @ x - b

    opt = levenberg(initial_damping=0.5, damping_rule="multiply", decrease_factor=4.0)
    x = torch.zeros(3, dtype=torch.float64)
    state = opt.init(x)
    extra = _extras(residual_fn, x)
    updates, state = opt.update(extra["grad"], state, x, **extra)
    assert torch.allclose(state.ratio, T(1.0, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(state.damping, T(0.125, dtype=torch.float64))
    expected = torch.linalg.solve(
        A.T @ A + 0.5 * torch.eye(3, dtype=A.dtype), A.T @ b
    )  # g = -A^T b at 0
    assert torch.allclose(updates, expected, atol=1e-12)


def test_rejected_step_keeps_point_and_grows_damping():
    """r(x) = atan(x) from x = 2: the Gauss-Newton step -r/r' = -5 atan(2) lands at
    x = -3.54 where |r| is larger, so the step is rejected."""

    def residual_fn(x):
        return torch.atan(x)

    opt = levenberg(initial_damping=1e-12, damping_rule="multiply", increase_factor=10.0)
    x = T([2.0], dtype=torch.float64)
    state = opt.init(x)
    extra = _extras(residual_fn, x)
    updates, state = opt.update(extra["grad"], state, x, **extra)
    d = -5 * np.arctan(2.0) / (1 + 5 * 1e-12)  # (J^2 + lam) d = -J r with J = 1/5
    rho = (0.5 * np.arctan(2.0) ** 2 - 0.5 * np.arctan(2.0 + d) ** 2) / (
        -(np.arctan(2.0) / 5) * d - 0.5 * d * d / 25
    )
    assert rho < 0
    np.testing.assert_allclose(float(state.ratio), rho, rtol=1e-9)
    assert not bool(state.step_accepted)
    assert torch.equal(updates, torch.zeros_like(x))
    assert state.next_value == extra["value"] and torch.equal(state.next_grad, extra["grad"])
    assert torch.allclose(state.damping, T(1e-11, dtype=torch.float64))
    assert not bool(state.search_failed)
    # the next update retries from the same point with the larger damping
    updates, state = opt.update(extra["grad"], state, x, **extra)
    assert torch.allclose(state.damping, T(1e-10, dtype=torch.float64))


@pytest.mark.parametrize("make", [levenberg, levenberg_marquardt])
def test_update_is_pure(make, dtype):
    residual_fn, _ = _exp_fit()

    def residual_fn_dtype(p):
        return residual_fn(p.double()).to(dtype)

    x = T([1.0, 0.5], dtype=dtype)
    extra = _extras(residual_fn_dtype, x)
    grad = extra.pop("grad")  # the helper passes it positionally, then as an extra
    updates, state = assert_update_is_pure(make(), x, grad, steps=3, **extra)
    assert updates.dtype == dtype and state.damping.dtype == dtype


def test_least_squares_default_and_dtype(dtype):
    residual_fn, _ = _exp_fit()

    def residual_fn_dtype(p):
        return residual_fn(p.double()).to(dtype)

    x0 = T([1.0, 0.5], dtype=dtype)
    gtol = 1e-8 if dtype == torch.float64 else 1e-5  # |x - x*| ~ |g| here: gtol below tol
    result = sf.least_squares(residual_fn_dtype, x0, max_steps=50, gtol=gtol)
    reference = sf.least_squares(residual_fn, x0.double(), levenberg(), max_steps=100, gtol=1e-12)
    assert result.params.dtype == dtype
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    assert torch.allclose(result.params.double(), reference.params, rtol=tol, atol=tol)
    # the driver reused the published values: its own value_and_grad at the start only;
    # the dense solver evaluates one Jacobian (and residual) at the start and per trial,
    # through least_squares' counted residual_fn (values of 0.5 |r|^2: the start's only)
    assert result.num_grad_evals == 1
    assert result.num_value_evals == 1
    assert result.num_residual_evals == result.num_steps + 1
    assert result.num_hvp_evals == 2 * (result.num_steps + 1)


def test_pytree_params_and_counts():
    t = torch.linspace(0, 1, 5, dtype=torch.float64)

    def residual_fn(p):
        return {"fit": p["a"] * t + p["b"][0] - torch.exp(t), "reg": 0.1 * p["b"]}

    params = {"a": T(0.0, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    result = sf.least_squares(residual_fn, params, max_steps=20, gtol=1e-10)
    A = torch.stack([t, torch.ones_like(t)], 1)
    A = torch.cat([A, T([[0.0, 0.1]], dtype=torch.float64)])
    rhs = torch.cat([torch.exp(t), torch.zeros(1, dtype=torch.float64)])
    expected = torch.linalg.lstsq(A, rhs[:, None]).solution[:, 0]
    assert torch.allclose(result.params["a"], expected[0], atol=1e-8)
    assert torch.allclose(result.params["b"][0], expected[1], atol=1e-8)
    # dense Jacobians (n = 2 products each) at the start and at every trial point
    assert result.num_hvp_evals == 2 * (result.num_steps + 1)


def test_general_loss_uses_hessian_products():
    pytest.importorskip("soo_func.krylov")

    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    result = sf.minimize(rosenbrock, T([-1.2, 1.0], dtype=torch.float64), levenberg(), gtol=1e-8)
    assert result.converged
    assert torch.allclose(result.params, T([1.0, 1.0], dtype=torch.float64), atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="tau"):
        levenberg(tau=0)
    with pytest.raises(ValueError, match="damping_rule"):
        levenberg(damping_rule="halve")
    with pytest.raises(ValueError, match="min_damping"):
        levenberg_marquardt(min_damping=1.0, max_damping=0.5)
    with pytest.raises(ValueError, match="solver"):
        levenberg(solver="svd")
    opt = levenberg_marquardt()
    x = T([1.0, 2.0])
    with pytest.raises(TypeError, match="residual_fn"):
        opt.update(x, opt.init(x), x, value_fn=lambda p: (p**2).sum())
    with pytest.raises(TypeError, match="value_fn"):
        levenberg().update(x, opt.init(x), x)


def _smooth_loss():
    """f(x) = sum sqrt(1 + (A x - b)^2) + 0.05 |x|^2 (pseudo-Huber): not a least-squares
    loss, a positive definite Hessian everywhere, and Newton steps that overshoot on the
    linear tails (so some trial points are rejected)."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)

    def value_fn(x):
        return torch.sqrt(1 + (a @ x - b) ** 2).sum() + 0.05 * x @ x

    return value_fn


@pytest.mark.parametrize("rule", ["nielsen", "multiply"])
def test_levenberg_damps_a_published_newton_model_as_the_dense_formula(rule):
    """chain(newton_krylov(), levenberg()): each step is (H + lam I) d = -g with the dense
    Hessian H = torch.func.hessian(f), the first lam = tau <g, H g> / |g|^2, the ratio and
    the damping sequence recomputed in numpy (Levenberg 1944; MNT 2004 eq. (3.14))."""
    pytest.importorskip("soo_func.krylov")
    value_fn = _smooth_loss()
    tau = 0.5
    opt = sf.chain(
        sf.directions.newton_krylov(solver="cg"),
        levenberg(tau=tau, damping_rule=rule, cg_rtol=1e-13),
    )
    x = torch.full((4,), 3.0, dtype=torch.float64)
    state = opt.init(x)
    lam, nu = None, 2.0
    accepted = []
    for _ in range(6):
        value, grad = sf.value_and_grad(value_fn)(x)
        H = torch.func.hessian(value_fn)(x).numpy()
        g = grad.numpy()
        if lam is None:
            lam = tau * (g @ H @ g) / (g @ g)
        d = np.linalg.solve(H + lam * np.eye(4), -g)
        predicted = -(g @ d) - 0.5 * d @ H @ d
        rho = (float(value) - float(value_fn(x + torch.from_numpy(d)))) / predicted
        extra = {"value": value, "grad": grad, "value_fn": value_fn}
        updates, state = opt.update(grad, state, x, **extra)
        lev = state.states[-1]
        np.testing.assert_allclose(float(lev.ratio), rho, rtol=1e-6)
        accepted.append(rho > 1e-4)
        if rho > 1e-4:
            np.testing.assert_allclose(updates.numpy(), d, rtol=1e-8, atol=1e-12)
            shrink = max(1 / 3, 1 - (2 * rho - 1) ** 3) if rule == "nielsen" else 0.1
            lam, nu = lam * shrink, 2.0
        else:
            assert torch.equal(updates, torch.zeros_like(x))
            lam, nu = (lam * nu, 2 * nu) if rule == "nielsen" else (lam * 10.0, nu)
        np.testing.assert_allclose(float(lev.damping), lam, rtol=1e-9)
        x = x + updates
    assert any(accepted) and not all(accepted), accepted  # both branches exercised


def test_levenberg_after_newton_krylov_solves_rosenbrock_through_indefinite_hessians():
    """From (-1.2, 1) the Rosenbrock Hessian is indefinite (x1^2 > x2 + 1/200) and Newton
    steps overshoot: rejected steps grow lam, accepted ones shrink it, and the minimum
    (1, 1) is reached with one trial evaluation per step."""
    pytest.importorskip("soo_func.krylov")

    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    opt = sf.chain(sf.directions.newton_krylov(solver="cg"), levenberg())
    result = sf.minimize(rosenbrock, T([-1.2, 1.0], dtype=torch.float64), opt, gtol=1e-8)
    assert result.converged, result.reason
    assert torch.allclose(result.params, T([1.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert result.num_value_evals == result.num_steps + 1  # one trial point per step
    accepted = [row["step_accepted"] for row in result.history[1:]]
    assert 0 < sum(accepted) < len(accepted)


def test_dense_jacobian_follows_the_residual_fn_at_the_same_point():
    """Alternating residual functions (training batches) at one point: each update must
    take its own function's step, (J^T J + lam I) d = -J^T r with that function's J and
    r, and the gain ratio of that step (issue 16: the dense Jacobian cache was keyed on
    the params alone, so the second function reused the first one's Jacobian)."""
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    ya, yb = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2))

    def residual_a(x):
        return a @ x - ya

    def residual_b(x):
        return torch.tanh(b @ x) - yb

    opt = levenberg(solver="dense", initial_damping=0.5, damping_rule="multiply")
    x = torch.zeros(3, dtype=torch.float64)
    state = opt.init(x)
    accepted = []
    for residual_fn in (residual_a, residual_b, residual_a, residual_b, residual_a):
        extra = _extras(residual_fn, x)
        J = torch.func.jacfwd(residual_fn)(x).numpy()
        r = residual_fn(x).numpy()
        lam = 0.5 if float(state.damping) < 0 else float(state.damping)
        d = np.linalg.solve(J.T @ J + lam * np.eye(3), -J.T @ r)
        predicted = -(r @ J @ d) - 0.5 * (J @ d) @ (J @ d)
        actual = float(extra["value"]) - float(extra["value_fn"](x + torch.from_numpy(d)))
        updates, state = opt.update(extra["grad"], state, x, **extra)
        np.testing.assert_allclose(float(state.ratio), actual / predicted, rtol=1e-8)
        accepted.append(actual / predicted > 1e-4)
        expected = d if accepted[-1] else np.zeros(3)
        np.testing.assert_allclose(updates.numpy(), expected, rtol=1e-10, atol=1e-14)
        x = x + updates
    assert sum(accepted) >= 3, accepted


def test_function_tokens_are_not_reused_after_the_function_is_freed():
    """A closure made per batch often gets the freed one's id(); its token is new."""
    tokens = []
    for k in range(3):

        def residual_fn(x, k=k):
            return x + k

        tokens.append(function_token(residual_fn))
        assert function_token(residual_fn) == tokens[-1]
        del residual_fn
    assert len(set(tokens)) == 3
