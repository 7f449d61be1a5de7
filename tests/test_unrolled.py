"""``adjoint="unrolled"``: autograd through the recorded steps (soo_func.drivers.unrolled).

References: the closed form of ridge regression (``dx*/dlam = -(A^T A + lam I)^{-1} x*``),
the implicit adjoint, central finite differences of re-solved problems, and, for runs of a
fixed number of steps with no host decision in them, central finite differences of the
same iteration (the unrolled derivative is the derivative of that map, converged or not).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_ridge_gradients_match_the_closed_form,
    ridge_closed_form,
    ridge_problem,
    ridge_value,
)

import soo_func as sf

D = torch.float64


def lbfgs_wolfe():
    return sf.chain(sf.lbfgs(), sf.wolfe())


def solve_ridge(a, b, lam, adjoint=None, optimizer=None, **kw):
    start = torch.zeros(a.shape[1], dtype=D)
    optimizer = lbfgs_wolfe() if optimizer is None else optimizer
    return sf.minimize(ridge_value, start, optimizer, args=(a, b, lam), adjoint=adjoint, **kw)


def test_unrolled_ridge_gradient_matches_the_closed_form_implicit_and_finite_differences():
    a, b = ridge_problem(seed=4)
    lam0 = torch.tensor(0.4, dtype=D)
    grads = {}
    for adjoint in ("unrolled", "implicit"):
        lam = lam0.clone().requires_grad_(True)
        result = solve_ridge(a, b, lam, adjoint, gtol=1e-11)
        assert result.converged, result.reason
        rows = [torch.autograd.grad(xi, lam, retain_graph=True)[0] for xi in result.params]
        grads[adjoint] = torch.stack(rows)  # dx*/dlam
    x_star = ridge_closed_form(a, b, lam0)
    n = a.shape[1]
    closed = -torch.linalg.solve(a.T @ a + lam0 * torch.eye(n, dtype=D), x_star)
    torch.testing.assert_close(grads["unrolled"], closed, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grads["unrolled"], grads["implicit"], rtol=1e-7, atol=1e-10)
    h = 1e-5
    up = solve_ridge(a, b, lam0 + h, gtol=1e-12).params
    down = solve_ridge(a, b, lam0 - h, gtol=1e-12).params
    torch.testing.assert_close(grads["unrolled"], (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


def test_unrolled_gradients_with_respect_to_the_data_match_the_closed_form():
    a, b = ridge_problem(seed=1)
    inputs = [t.clone().requires_grad_(True) for t in (a, b, torch.tensor(0.7, dtype=D))]
    result = solve_ridge(*inputs, "unrolled", gtol=1e-11)
    assert result.converged, result.reason
    assert_ridge_gradients_match_the_closed_form(result, inputs)


def test_unrolled_takes_the_steps_of_minimize():
    a, b = ridge_problem(seed=2)
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)
    plain = solve_ridge(a, b, lam.detach(), gtol=1e-10)
    unrolled = solve_ridge(a, b, lam, "unrolled", gtol=1e-10)
    assert (unrolled.num_steps, unrolled.reason) == (plain.num_steps, plain.reason)
    torch.testing.assert_close(unrolled.params.detach(), plain.params, rtol=0, atol=0)
    values = [row["value"] for row in unrolled.history]
    assert values == [row["value"] for row in plain.history]
    # the accepted point is evaluated once more, with its graph: one value and gradient a step
    assert unrolled.num_grad_evals == plain.num_grad_evals + plain.num_steps


@pytest.mark.parametrize(
    "optimizer",
    [sf.sgd(0.02), sf.lbfgs(memory_size=3), sf.bfgs(), sf.bfgs(form="direct"), sf.ssbfgs()],
    ids=["gradient_descent", "lbfgs", "dense_bfgs", "dense_bfgs_direct", "dense_ssbfgs"],
)
def test_unrolled_is_the_derivative_of_a_truncated_run(optimizer):
    # no host decision in these steps: the k-step map is smooth, its central differences
    # are the reference, converged or not (4 steps, far from the minimizer)
    a, b = ridge_problem(seed=3)
    lam0 = torch.tensor(0.5, dtype=D)
    x0 = torch.full((a.shape[1],), 0.3, dtype=D)

    def run(lam, start, adjoint=None):
        return sf.minimize(
            ridge_value, start, optimizer, args=(a, b, lam), adjoint=adjoint, max_steps=4, gtol=0
        )

    lam = lam0.clone().requires_grad_(True)
    start = x0.clone().requires_grad_(True)
    result = run(lam, start, "unrolled")
    assert result.reason == "max_steps"
    probe = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D)
    d_lam, d_start = torch.autograd.grad(result.params @ probe, (lam, start))
    h = 1e-6
    fd_lam = (run(lam0 + h, x0).params - run(lam0 - h, x0).params) @ probe / (2 * h)
    assert abs(float(d_lam) - float(fd_lam)) <= 1e-6 * max(abs(float(fd_lam)), 1.0)
    for i in range(len(x0)):
        e = torch.zeros_like(x0)
        e[i] = h
        fd = (run(lam0, x0 + e).params - run(lam0, x0 - e).params) @ probe / (2 * h)
        assert abs(float(d_start[i]) - float(fd)) <= 1e-6 * max(abs(float(fd)), 1.0)
    assert start.grad is None and not x0.requires_grad  # the caller's tensors untouched


def decay_residuals(params, t, y):
    return params["a"] * torch.exp(-params["b"] * t) + params["c"] - y


@pytest.mark.parametrize(
    ("optimizer", "gtol"),
    [
        (sf.chain(sf.gauss_newton(rtol=1e-12), sf.wolfe()), 1e-10),
        (sf.levenberg_marquardt(damping_rule="nielsen"), 1e-9),  # stops at |g| ~ 1e-10
    ],
    ids=["gauss_newton_wolfe", "levenberg_marquardt_nielsen"],
)
def test_least_squares_unrolled_matches_implicit_and_finite_differences(optimizer, gtol):
    t = torch.linspace(0, 4, 30, dtype=D)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 + 0.01 * torch.sin(7 * t)
    start = {k: torch.tensor(v, dtype=D) for k, v in (("a", 1.0), ("b", 1.0), ("c", 0.0))}

    def solve(y, adjoint=None, opt=optimizer):
        return sf.least_squares(
            decay_residuals, start, opt, args=(t, y), gtol=gtol, adjoint=adjoint
        )

    grads = {}
    for adjoint in ("unrolled", "implicit"):
        y_req = y.clone().requires_grad_(True)
        result = solve(y_req, adjoint)
        assert result.converged and result.num_residual_evals > 0, result.reason
        (grads[adjoint],) = torch.autograd.grad(result.params["b"], y_req)
    torch.testing.assert_close(grads["unrolled"], grads["implicit"], rtol=1e-5, atol=1e-7)
    h = 1e-6
    gauss_newton = sf.chain(sf.gauss_newton(rtol=1e-12), sf.wolfe())
    for i in (0, 11, 29):
        e = torch.zeros_like(y)
        e[i] = h
        up = solve(y + e, opt=gauss_newton).params["b"]
        fd = (up - solve(y - e, opt=gauss_newton).params["b"]) / (2 * h)
        got = float(grads["unrolled"][i])
        assert abs(got - float(fd)) <= 1e-5 * max(abs(float(fd)), 1e-2), (i, got, fd)


def test_unrolled_gradient_of_an_unconverged_run_does_not_raise():
    # unlike the implicit adjoint, the steps of a truncated run have a derivative
    a, b = ridge_problem()
    lam = torch.tensor(0.4, dtype=D, requires_grad=True)
    result = solve_ridge(a, b, lam, "unrolled", max_steps=2, gtol=1e-12)
    assert result.reason == "max_steps" and not result.converged
    (grad,) = torch.autograd.grad(result.params.sum(), lam)
    assert torch.isfinite(grad)


def test_unrolled_exception_carries_the_partial_result():
    a, b = ridge_problem()
    lam = torch.tensor(0.4, dtype=D, requires_grad=True)
    calls = []

    def failing(x, a, b, lam):
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return ridge_value(x, a, b, lam)

    start = torch.zeros(a.shape[1], dtype=D)
    with pytest.raises(KeyboardInterrupt) as info:
        sf.minimize(failing, start, lbfgs_wolfe(), args=(a, b, lam), adjoint="unrolled")
    partial = info.value.partial_result
    assert partial.reason == "interrupted: KeyboardInterrupt" and partial.num_steps >= 1
    torch.autograd.grad(partial.params.sum(), lam)  # the last good point keeps its graph


def test_unrolled_reports_the_gradient_norm_past_float32_overflow():
    """|g|^2 overflows float32 (4 entries of 1e19); the reported norm is the scaled 2e19, as
    minimize's (no inf in the history or the result)."""

    def value_fn(x):
        return 1e19 * (x - 2).square().sum() / 2

    x0 = torch.ones(4, dtype=torch.float32)
    assert not torch.isfinite(sf.tree.norm(torch.full((4,), 1e19)))
    for adjoint in (None, "unrolled"):
        result = sf.minimize(value_fn, x0, sf.scale(-1e-19), adjoint=adjoint, max_steps=1)
        assert result.history[0]["grad_norm"] == pytest.approx(2e19, rel=1e-6)
        assert torch.isfinite(result.grad_norm)
