"""The ``recover_objective`` protocol key: the homotopy maps ``f_t`` and its gradient at
the accepted point to ``f`` and its gradient there, so the driver does not evaluate ``f``
again at every step while ``t < 1`` (exact counts, against a driver run without it)."""

from __future__ import annotations

import pytest
import torch

import soo_func as sf
from soo_func.base import Transform
from soo_func.continuation import homotopy


def problem(dtype):
    a = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=dtype)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)

    def value_fn(x):
        return 0.5 * x @ a @ x - b @ x + 0.25 * (x**4).sum()

    return value_fn, torch.tensor([4.0, -3.0, 5.0], dtype=dtype)


def without_recovery(opt: Transform) -> Transform:
    """``opt`` with ``recover_objective`` removed from what it publishes (the old driver path)."""

    def publish(state, params=None, **extra):
        out = dict(opt.publish(state, params, **extra))
        out.pop("recover_objective", None)
        return out

    return Transform(opt.init, opt.update, publish)


@pytest.mark.parametrize("family", ["keller", "convex"])
def test_recovered_value_and_gradient_are_those_of_f(dtype, family):
    value_fn, x0 = problem(dtype)
    h = homotopy(family)
    state = h.init(x0)
    value, grad = sf.value_and_grad(value_fn)(x0)
    _, state = h.update(grad, state, x0, value=value, grad=grad, value_fn=value_fn)
    published = h.publish(state, x0, value=value, grad=grad, value_fn=value_fn)
    assert 0 < float(state.t) < 1
    x = x0 + torch.tensor([0.3, -0.2, 0.1], dtype=dtype)
    # independent reference: f_t written out by hand from the family's definition
    t, g0 = state.t, grad
    if family == "keller":
        f_t = lambda p: value_fn(p) - (1 - t) * (g0 @ p)  # noqa: E731
    else:
        s = state.anchor_curvature
        f_t = lambda p: t * value_fn(p) + (1 - t) * 0.5 * s * ((p - x0) ** 2).sum()  # noqa: E731
    v_t, g_t = sf.value_and_grad(f_t)(x)
    v, g = published["recover_objective"](v_t, g_t, x)
    v_ref, g_ref = sf.value_and_grad(value_fn)(x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v, v_ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)


def test_no_recovery_for_user_families_or_small_convex_t():
    value_fn, x0 = problem(torch.float64)
    value, grad = sf.value_and_grad(value_fn)(x0)
    for h in (homotopy(lambda p, t: value_fn(p) * t), homotopy("convex", stage_step=0.05)):
        state = h.init(x0)
        _, state = h.update(grad, state, x0, value=value, grad=grad, value_fn=value_fn)
        published = h.publish(state, x0, value=value, grad=grad, value_fn=value_fn)
        assert "value_fn" in published and "recover_objective" not in published


@pytest.mark.parametrize("family", ["keller", "convex"])
def test_driver_saves_exactly_one_evaluation_per_rewritten_step(family):
    value_fn, x0 = problem(torch.float64)

    def make():
        return sf.chain(homotopy(family), sf.newton_krylov(), sf.armijo())

    new = sf.minimize(value_fn, x0, make(), gtol=1e-10, max_steps=100)
    old = sf.minimize(value_fn, x0, without_recovery(make()), gtol=1e-10, max_steps=100)
    assert new.converged and old.converged and new.num_steps == old.num_steps
    # a step is rewritten while t < 1, and on the first step of a stage (a predictor jump,
    # the objective seen from the predicted point) -- except convex steps at t < 0.1
    rewritten = [
        row for row in new.history[1:]
        if row["continuation_t"] < 1 or row["continuation_restart"]
    ]  # fmt: skip
    saved = sum(1 for row in rewritten if family == "keller" or row["continuation_t"] >= 0.1)
    assert saved >= 3
    assert old.num_value_evals - new.num_value_evals == saved
    assert old.num_grad_evals - new.num_grad_evals == saved
    assert new.num_hvp_evals == old.num_hvp_evals
    torch.testing.assert_close(new.params, old.params, rtol=1e-10, atol=1e-10)
    for row_new, row_old in zip(new.history, old.history, strict=True):
        assert row_new["value"] == pytest.approx(row_old["value"], rel=1e-12, abs=1e-12)
