"""gauss_newton and oracles.ggn_operator against dense J^T J and J^T H_L J."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_update_is_pure
from test_krylov import no_host_sync

import soo_func as sf
from soo_func.directions.gauss_newton import gauss_newton


def residual_problem(dtype, device="cpu"):
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, 9, dtype=dtype, device=device)
    y = torch.randn(9, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    def residual_fn(p):
        return p["a"] * torch.exp(-p["k"] * t) + p["c"][0] * t - y

    params = {
        "a": torch.tensor(1.5, dtype=dtype, device=device),
        "k": torch.tensor(0.7, dtype=dtype, device=device),
        "c": torch.tensor([0.2], dtype=dtype, device=device),
    }
    return residual_fn, params


def classifier_problem(dtype):
    """A tiny MLP with softmax cross-entropy: H_L = diag(p) - p p^T per sample."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    params = {
        "w1": (0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)).to(dtype),
        "w2": (0.5 * torch.randn(4, 3, generator=g, dtype=torch.float64)).to(dtype),
    }

    def model_fn(p):
        return torch.tanh(x @ p["w1"]) @ p["w2"]

    def loss_fn(logits):
        return torch.nn.functional.cross_entropy(logits, labels)

    return model_fn, loss_fn, params


def dense_ggn(model_fn, loss_fn, params):
    flat = sf.tree.ravel(params)

    def outputs(z):
        return model_fn(sf.tree.unravel(z, flat)).reshape(-1)

    z = flat.flat
    jac = torch.autograd.functional.jacobian(outputs, z)
    out = outputs(z)
    shape = model_fn(params).shape
    if loss_fn is None:
        h_l = torch.eye(out.numel(), dtype=out.dtype)
    else:
        h_l = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(shape)), out)
    return jac.T @ h_l @ jac


def flat(x):
    return sf.tree.ravel(x).flat


def test_ggn_operator_matches_dense_jtj_and_ggn_vp(dtype):
    residual_fn, params = residual_problem(dtype)
    dense = dense_ggn(residual_fn, None, params)
    _, matvec = sf.oracles.ggn_operator(residual_fn, params)
    v = {"a": torch.tensor(0.3, dtype=dtype), "k": torch.tensor(-1.0, dtype=dtype),
         "c": torch.tensor([2.0], dtype=dtype)}  # fmt: skip
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(flat(matvec(v)), dense @ flat(v), rtol=tol, atol=tol)
    torch.testing.assert_close(
        flat(sf.ggn_vp(residual_fn, params, v)), flat(matvec(v)), rtol=tol, atol=tol
    )


def test_ggn_operator_matches_dense_jt_hl_j_for_cross_entropy(dtype):
    model_fn, loss_fn, params = classifier_problem(dtype)
    dense = dense_ggn(model_fn, loss_fn, params)
    _, matvec = sf.oracles.ggn_operator(model_fn, params, loss_fn)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for seed in range(3):
        v = sf.tree.unravel(
            torch.randn(24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
                dtype
            ),
            params,
        )
        torch.testing.assert_close(flat(matvec(v)), dense @ flat(v), rtol=tol, atol=tol)
    # The GGN is PSD (cross-entropy is convex in the logits) and differs from the Hessian.
    assert float(torch.linalg.eigvalsh(dense.double()).min()) > -1e-5
    counted = sf.CountedObjective(model_fn)
    _, mv = sf.oracles.ggn_operator(counted, params, loss_fn)
    mv(params)
    mv(params)
    assert counted.num_hvp_evals == 2


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_least_squares_direction_matches_dense_gauss_newton(damping, dtype):
    residual_fn, params = residual_problem(dtype)

    def value_fn(p):
        return 0.5 * (residual_fn(p) ** 2).sum()

    _value, grad = sf.value_and_grad(value_fn)(params)
    opt = gauss_newton(damping=damping, rtol=1e-10 if dtype == torch.float64 else 1e-6)
    d, state = opt.update(grad, opt.init(params), params, grad=grad, residual_fn=residual_fn)
    g_dense = dense_ggn(residual_fn, None, params).double()
    expected = -torch.linalg.solve(
        g_dense + damping * torch.eye(3, dtype=torch.float64), flat(grad).double()
    )
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(flat(d).double(), expected, rtol=tol, atol=tol)
    assert d["a"].dtype == dtype and not bool(state.fallback)


def test_model_loss_direction_matches_dense_ggn_solve():
    model_fn, loss_fn, params = classifier_problem(torch.float64)

    def value_fn(p):
        return loss_fn(model_fn(p))

    value, grad = sf.value_and_grad(value_fn)(params)
    damping = 1e-2
    opt = gauss_newton(model_fn, loss_fn, damping=damping, rtol=1e-10, max_iters=200)
    d, state = opt.update(grad, opt.init(params), params, value=value, grad=grad, value_fn=value_fn)
    dense = dense_ggn(model_fn, loss_fn, params)
    expected = -torch.linalg.solve(dense + damping * torch.eye(24, dtype=torch.float64), flat(grad))
    torch.testing.assert_close(flat(d), expected, rtol=1e-7, atol=1e-8)
    published = sf.publish(opt, state, params, value_fn=value_fn)
    v = sf.tree.ones_like(params)
    torch.testing.assert_close(
        flat(published["curvature"](v)),
        (dense + damping * torch.eye(24, dtype=torch.float64)) @ flat(v),
    )


def test_update_is_pure(dtype):
    residual_fn, params = residual_problem(dtype)

    def value_fn(p):
        return 0.5 * (residual_fn(p) ** 2).sum()

    value, grad = sf.value_and_grad(value_fn)(params)
    _d, state = assert_update_is_pure(gauss_newton(damping=1e-3), params, grad, value=value,
                                     value_fn=value_fn, residual_fn=residual_fn)  # fmt: skip
    assert int(state.count) == 3
    model_fn, loss_fn, params = classifier_problem(dtype)
    value, grad = sf.value_and_grad(lambda p: loss_fn(model_fn(p)))(params)
    assert_update_is_pure(gauss_newton(model_fn, loss_fn, damping=1e-3, max_iters=5), params, grad)


def test_least_squares_driver_converges():
    residual_fn, params = residual_problem(torch.float64)
    res = sf.least_squares(
        residual_fn, params, sf.chain(gauss_newton(), sf.armijo()), gtol=1e-10, max_steps=100
    )
    assert res.converged
    # First-order optimality of the fitted curve, checked against a dense Jacobian.
    flat_p = sf.tree.ravel(res.params)
    jac = torch.autograd.functional.jacobian(
        lambda z: residual_fn(sf.tree.unravel(z, flat_p)), flat_p.flat
    )
    assert float((jac.T @ residual_fn(res.params)).abs().max()) < 1e-9


def test_errors():
    with pytest.raises(ValueError, match="model_fn"):
        gauss_newton(loss_fn=lambda o: o.sum())
    with pytest.raises(ValueError, match="damping"):
        gauss_newton(damping=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        gauss_newton(rtol=0.0)
    _residual_fn, params = residual_problem(torch.float64)
    opt = gauss_newton()
    with pytest.raises(TypeError, match="residual_fn"):
        opt.update(params, opt.init(params), params)


def test_gauss_newton_on_device(device):
    residual_fn, params = residual_problem(torch.float64, device)
    opt = gauss_newton()
    d, state = opt.update(params, opt.init(params), params, residual_fn=residual_fn)
    assert d["a"].device.type == device.type and state.count.device.type == device.type


def test_update_makes_no_host_sync():
    residual_fn, params = residual_problem(torch.float64)
    model_fn, loss_fn, cparams = classifier_problem(torch.float64)
    opt = gauss_newton()
    opt2 = gauss_newton(model_fn, loss_fn, damping=1e-3)
    with no_host_sync():
        opt.update(params, opt.init(params), params, residual_fn=residual_fn)
        opt2.update(cparams, opt2.init(cparams), cparams)


def test_published_curvature_drives_a_trust_region():
    residual_fn, params = residual_problem(torch.float64)
    opt = sf.chain(gauss_newton(), sf.trust_region())
    # gtol 1e-8: near 1e-10 the predicted decrease (~1e-19) is below f's rounding (~1e-16).
    res = sf.least_squares(residual_fn, params, opt, gtol=1e-8, max_steps=200)
    reference = sf.least_squares(residual_fn, params, sf.chain(gauss_newton(), sf.armijo()),
                                 gtol=1e-8, max_steps=200)  # fmt: skip
    assert res.converged and reference.converged
    # Same minimizer (the problem is ill-conditioned: |g| <= 1e-8 pins params to ~1e-5).
    assert abs(float(res.value - reference.value)) <= 1e-14
    torch.testing.assert_close(res.params, reference.params, atol=1e-5, rtol=0)
