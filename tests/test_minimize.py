"""The drivers: stopping rules, evaluation counts and reuse, non-finite values, least squares."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

import soo_func as sf
from soo_func import tree
from soo_func.drivers.stopping import MAX_FAILED_SEARCHES, UNBOUNDED_RATIO

DIAG = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)


def quadratic(params):
    """0.5 sum d_i x_i^2 + 0.5 y^2: minimum 0 at the origin."""
    return 0.5 * (DIAG.to(params["x"]) * params["x"] ** 2).sum() + 0.5 * (params["y"] ** 2).sum()


def start(dtype=torch.float64):
    return {
        "x": torch.tensor([1.0, -1.0, 0.5], dtype=dtype),
        "y": torch.tensor([2.0], dtype=dtype),
    }


def test_gtol_stops_at_the_first_point_below(dtype):
    result = sf.minimize(quadratic, start(dtype), sf.sgd(0.1), max_steps=1000, gtol=1e-4)
    assert result.converged and result.reason == "gtol"
    assert float(tree.norm(result.grad, math.inf)) <= 1e-4
    # the step before had not yet converged, and sgd's iterates follow x_k = (1 - 0.1 d)^k x_0
    assert result.history[-2]["grad_norm"] > 1e-4
    k = result.num_steps
    expected_x = (1 - 0.1 * DIAG) ** k * start()["x"]
    assert torch.allclose(result.params["x"].double(), expected_x, rtol=1e-4, atol=1e-6)
    assert result.params["x"].dtype == dtype and result.value.dtype == dtype
    assert len(result.history) == result.num_steps + 1


def test_converged_at_start_takes_no_step():
    params = {"x": torch.zeros(3, dtype=torch.float64), "y": torch.zeros(1, dtype=torch.float64)}
    result = sf.minimize(quadratic, params, sf.sgd(0.1))
    assert result.converged and result.num_steps == 0 and result.num_value_evals == 1


def test_ftol_and_max_steps():
    result = sf.minimize(quadratic, start(), sf.sgd(1e-3), max_steps=10_000, gtol=0.0, ftol=1e-3)
    assert result.reason == "ftol" and result.converged
    last, before = result.history[-1]["value"], result.history[-2]["value"]
    assert before - last <= 1e-3 * max(abs(before), abs(last), 1.0)
    earlier = result.history[-3]["value"]
    assert earlier - before > 1e-3 * max(abs(earlier), abs(before), 1.0)
    result = sf.minimize(quadratic, start(), sf.sgd(1e-3), max_steps=7, gtol=0.0)
    assert (result.reason, result.converged, result.num_steps) == ("max_steps", False, 7)


def test_callback_stops_and_sees_rows():
    seen = []

    def callback(row, params):
        seen.append((row["step"], float(quadratic(params))))
        return row["step"] == 3

    result = sf.minimize(quadratic, start(), sf.sgd(0.1), gtol=0.0, callback=callback)
    assert result.reason == "callback" and result.num_steps == 3 and not result.converged
    assert [s for s, _ in seen] == [1, 2, 3]
    assert seen[-1][1] == pytest.approx(float(result.value), rel=1e-15)


def test_sgd_evaluates_once_per_step_and_does_not_touch_params():
    params = start()
    versions = [leaf._version for leaf in tree.leaves(params)]
    result = sf.minimize(quadratic, params, sf.sgd(0.1), max_steps=5, gtol=0.0)
    assert result.num_value_evals == result.num_grad_evals == 6
    assert result.num_hvp_evals == 0
    assert [row["num_value_evals"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert versions == [leaf._version for leaf in tree.leaves(params)]
    assert torch.equal(params["x"], start()["x"])


class LookaheadState(NamedTuple):
    next_value: torch.Tensor
    next_grad: dict


def lookahead_step(step: float, publish_fn_is_objective: bool = True):
    """Gradient descent that evaluates the next point itself and publishes it (as a search does)."""

    def init(params):
        return LookaheadState(torch.zeros((), dtype=torch.float64), tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        sf.require_extras("lookahead_step", extra, "value_fn")
        direction = tree.scale(-step, updates)
        value, grad = sf.value_and_grad(extra["value_fn"])(tree.add(params, direction))
        return direction, LookaheadState(value, grad)

    def publish(state, params=None, **extra):
        fn = extra["value_fn"] if publish_fn_is_objective else quadratic
        return {"next_value": state.next_value, "next_grad": state.next_grad, "next_value_fn": fn}

    return sf.Transform(init, update, publish)


def test_published_next_point_is_reused():
    result = sf.minimize(quadratic, start(), lookahead_step(0.1), max_steps=5, gtol=0.0)
    assert result.num_value_evals == result.num_grad_evals == 6  # one at start, one per step
    reference = sf.minimize(quadratic, start(), sf.sgd(0.1), max_steps=5, gtol=0.0)
    assert torch.allclose(result.value, reference.value, rtol=1e-15)
    inside_chain = sf.chain(sf.scale(1.0), lookahead_step(0.1))
    result = sf.minimize(quadratic, start(), inside_chain, max_steps=5, gtol=0.0)
    assert result.num_value_evals == 6


def test_next_point_for_another_objective_is_not_reused():
    result = sf.minimize(quadratic, start(), lookahead_step(0.1, False), max_steps=5, gtol=0.0)
    assert result.num_value_evals == result.num_grad_evals == 11


def test_non_finite_value_mid_run_returns_last_finite_point():
    def blows_up(params):
        x = params["x"]
        return torch.where(x.sum() > 3.5, torch.tensor(float("nan"), dtype=x.dtype), -x.sum())

    params = {"x": torch.zeros(2, dtype=torch.float64)}
    result = sf.minimize(blows_up, params, sf.sgd(1.0), max_steps=100)
    assert result.reason.startswith("non-finite")
    assert not result.converged
    # steps of +1 per coordinate: x = (1,1) sum 2, x = (2,2) sum 4 -> NaN; last finite is (1,1)
    assert torch.equal(result.params["x"], torch.ones(2, dtype=torch.float64))
    assert result.value == -2.0 and torch.isfinite(result.value)


def test_non_finite_start_and_bad_params_are_rejected():
    with pytest.raises(ValueError, match="starting params"):
        sf.minimize(lambda p: torch.log(p["x"]).sum(), {"x": torch.zeros(2)}, sf.sgd(0.1))
    with pytest.raises(ValueError, match="gradient"):
        sf.minimize(lambda p: torch.sqrt(p["x"]).sum(), {"x": torch.zeros(2)}, sf.sgd(0.1))
    with pytest.raises(TypeError, match="floating-point"):
        sf.minimize(lambda p: p["x"].sum(), {"x": torch.zeros(2, dtype=torch.long)}, sf.sgd(0.1))
    with pytest.raises(TypeError, match="leaf at"):
        sf.minimize(lambda p: p["x"].sum(), {"x": torch.zeros(2), "n": 3}, sf.sgd(0.1))
    with pytest.raises(ValueError, match="empty"):
        sf.minimize(lambda p: torch.zeros(()), {}, sf.sgd(0.1))
    with pytest.raises(ValueError, match="scalar"):
        sf.minimize(lambda p: p["x"] ** 2, {"x": torch.ones(2)}, sf.sgd(0.1))


def test_missing_extra_names_transform_and_argument():
    def init(params):
        return sf.EmptyState()

    def update(updates, state, params=None, **extra):
        sf.require_extras("needs_residuals", extra, "residual_fn")
        return updates, state

    opt = sf.Transform(init, update)
    with pytest.raises(TypeError, match=r"needs_residuals.*residual_fn"):
        sf.minimize(quadratic, start(), opt, max_steps=1)


class Seen(NamedTuple):
    residual_norm: torch.Tensor


def gauss_newton_probe():
    """Records |r(params)|^2 from the residual_fn extra and takes a small gradient step."""

    def init(params):
        return Seen(torch.zeros((), dtype=torch.float64))

    def update(updates, state, params=None, **extra):
        sf.require_extras("gauss_newton_probe", extra, "residual_fn")
        r = extra["residual_fn"](params)
        return tree.scale(-0.1, updates), Seen(tree.sum_of_squares(r))

    return sf.Transform(init, update)


def test_least_squares_passes_residual_fn_and_uses_half_sum_of_squares():
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def residual_fn(params):
        return {"a": params["x"] - target, "b": [2 * params["x"][:1]]}

    params = {"x": torch.zeros(2, dtype=torch.float64)}
    result = sf.least_squares(residual_fn, params, gauss_newton_probe(), max_steps=1, gtol=0.0)
    assert result.history[0]["value"] == pytest.approx(0.5 * (1 + 4))
    assert result.state.residual_norm == pytest.approx(5.0)  # r at the start: (-1, -2, 0)
    result = sf.least_squares(residual_fn, params, gauss_newton_probe(), max_steps=500, gtol=1e-8)
    # minimizer of 0.5 [(x1 - 1)^2 + (x2 - 2)^2 + 4 x1^2]: x1 = 1/5, x2 = 2
    assert result.converged
    assert torch.allclose(result.params["x"], torch.tensor([0.2, 2.0], dtype=torch.float64))


def test_result_fields_and_history():
    result = sf.minimize(quadratic, start(), sf.sgd(0.1), max_steps=3, gtol=0.0)
    row0 = result.history[0]
    assert row0["step"] == 0 and row0["step_norm"] == 0.0
    assert row0["value"] == pytest.approx(float(quadratic(start())))
    assert result.grad_norm == pytest.approx(float(tree.norm(result.grad)))
    assert result.history[1]["step_norm"] == pytest.approx(0.1 * result.history[0]["grad_norm"])
    assert isinstance(result.state, sf.base.SgdState)


def _explorer(start: torch.Tensor) -> sf.Transform:
    """Steps uphill (+1 per step) and publishes its starting point as the incumbent."""

    def update(updates, state, params=None, **extra):
        return torch.ones_like(updates), state

    def publish(state, params=None, **extra):
        return {"incumbent_params": start, "incumbent_value": (start**2).sum()}

    return sf.Transform(lambda p: (), update, publish)


def test_a_run_stopped_early_returns_a_lower_published_incumbent():
    def loss(x):
        return (x**2).sum()

    start = torch.tensor([0.5], dtype=torch.float64)
    result = sf.minimize(loss, start + 1.0, _explorer(start), max_steps=3, gtol=1e-12)
    assert not result.converged and "incumbent" in result.reason
    assert torch.equal(result.params, start) and float(result.value) == 0.25
    torch.testing.assert_close(result.grad, 2 * start)
    assert result.num_grad_evals == 1 + 3 + 1  # start, three steps, the incumbent
    # Not lower than the last point: the last point is returned.
    high = torch.tensor([10.0], dtype=torch.float64)
    result = sf.minimize(loss, start, _explorer(high), max_steps=2, gtol=1e-12)
    assert "incumbent" not in result.reason and float(result.params) == 2.5


# --- reliability (issue 16) ----------------------------------------------------------------

A2 = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)


def scaled_quadratic(p):
    """The issue's 1e-20-scaled quadratic: Wolfe's trials tie phi(0) to rounding."""
    x = p["x"] - 1
    return 1e-20 * 0.5 * x @ A2 @ x


def test_failed_search_below_rounding_stops_in_bounded_evaluations():
    params = {"x": torch.zeros(2, dtype=torch.float64)}
    opt = sf.chain(sf.lbfgs(), sf.wolfe())
    result = sf.minimize(scaled_quadratic, params, opt, gtol=1e-30)
    # before: max_steps after 25,001 evaluations
    assert result.reason.startswith("search_failed") and not result.converged
    assert result.num_value_evals <= 100 and result.num_steps <= 3
    assert float(result.value) <= float(scaled_quadratic(params))


def flaky_descent(step: float, fails: Callable[[int], bool]) -> sf.Transform:
    """Gradient descent with a fixed step that publishes ``search_failed`` when ``fails(k)``."""

    def update(updates, state, params=None, **extra):
        return tree.scale(-step, updates), state + 1

    def publish(state, params=None, **extra):
        return {"search_failed": torch.tensor(fails(int(state)))}

    return sf.Transform(lambda p: torch.zeros((), dtype=torch.int64), update, publish)


def test_failed_search_that_makes_progress_goes_on():
    result = sf.minimize(quadratic, start(), flaky_descent(0.1, lambda k: k <= 5), gtol=1e-6)
    assert result.converged and result.reason == "gtol" and result.num_steps > 20


def test_failed_searches_in_a_row_stop():
    result = sf.minimize(quadratic, start(), flaky_descent(0.1, lambda k: True), gtol=1e-12)
    assert not result.converged and "in a row" in result.reason
    assert result.num_steps == MAX_FAILED_SEARCHES


def test_failed_search_whose_step_is_below_rounding_of_the_params_stops():
    far = {"x": torch.full((3,), 1e6, dtype=torch.float64), "y": torch.ones(1, dtype=torch.float64)}
    # a step of 1e-30 * grad at |x| = 1e6 does not change the params: stop at once
    result = sf.minimize(quadratic, far, flaky_descent(1e-30, lambda k: True), gtol=0.0)
    assert result.reason.startswith("search_failed") and result.num_steps == 1


@pytest.mark.parametrize("direction", ["lbfgs", "bfgs", "nonlinear_cg"])
def test_unbounded_below_stops_quickly(direction):
    def linear(p):
        return -p["x"].sum()

    params = {"x": torch.zeros(2, dtype=torch.float64)}
    result = sf.minimize(linear, params, sf.chain(getattr(sf, direction)(), sf.wolfe()))
    # before: max_steps after 25,000+ evaluations at f = -1e29
    assert result.reason.startswith("unbounded") and not result.converged
    assert result.num_value_evals <= 100
    assert float(result.value) < -UNBOUNDED_RATIO


def test_minus_inf_reads_as_unbounded_and_returns_the_last_finite_point():
    def falls(p):
        x = p["x"]
        return torch.where(x.sum() > 3.5, torch.tensor(-math.inf, dtype=x.dtype), -x.sum())

    result = sf.minimize(falls, {"x": torch.zeros(2, dtype=torch.float64)}, sf.sgd(1.0))
    assert result.reason.startswith("unbounded") and float(result.value) == -2.0


def test_huge_float32_gradient_is_not_rejected_and_norms_do_not_overflow():
    def huge(p):
        return 1e25 * ((p["x"] - 1) ** 2).sum()

    params = {"x": torch.zeros(3)}
    result = sf.minimize(huge, params, sf.sgd(1e-26), max_steps=200, gtol=0.0, gtol_rel=1e-5)
    assert result.reason == "gtol_rel" and result.converged  # before: rejected as NaN/inf
    assert result.history[0]["grad_norm"] == pytest.approx(2e25 * math.sqrt(3), rel=1e-6)
    assert all(math.isfinite(row["grad_norm"]) for row in result.history)
    assert math.isfinite(float(result.grad_norm))
    opt = sf.chain(sf.newton_krylov(), sf.armijo())
    result = sf.minimize(huge, params, opt, max_steps=20)  # before: ValueError at the start
    assert math.isfinite(result.history[0]["grad_norm"])


def rosenbrock(p):
    x = p["x"]
    return ((1 - x[:-1]) ** 2).sum() + 100 * ((x[1:] - x[:-1] ** 2) ** 2).sum()


def raises_at(fn: Callable, call: int, error: BaseException) -> Callable:
    calls = [0]

    def wrapped(p):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return fn(p)

    return wrapped


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_attaches_the_partial_result_and_a_resume_follows_the_same_path(error):
    params = {"x": torch.tensor([-1.2, 1.0, -0.5], dtype=torch.float64)}
    opt = sf.chain(sf.lbfgs(), sf.wolfe())
    whole = sf.minimize(rosenbrock, params, opt, max_steps=15, gtol=0.0)
    with pytest.raises(type(error)) as caught:
        sf.minimize(raises_at(rosenbrock, 12, error), params, opt, max_steps=15, gtol=0.0)
    partial = caught.value.partial_result
    assert partial.reason == f"interrupted: {type(error).__name__}" and not partial.converged
    assert 0 < partial.num_steps < 15 and len(partial.history) == partial.num_steps + 1
    assert float(partial.value) <= float(rosenbrock(params))
    assert float(partial.value) == float(rosenbrock(partial.params))
    left = 15 - partial.num_steps
    resumed = sf.minimize(
        rosenbrock, partial.params, opt, state=partial.state, max_steps=left, gtol=0.0
    )
    assert resumed.num_steps == left
    torch.testing.assert_close(resumed.params["x"], whole.params["x"], rtol=0, atol=1e-12)


def test_least_squares_attaches_its_partial_result_and_resumes():
    def residuals(p):
        return torch.stack([10 * (p["x"][1] - p["x"][0] ** 2), 1 - p["x"][0]])

    params = {"x": torch.tensor([-1.2, 1.0], dtype=torch.float64)}
    whole = sf.least_squares(residuals, params, max_steps=6, gtol=0.0)
    with pytest.raises(RuntimeError) as caught:
        sf.least_squares(raises_at(residuals, 6, RuntimeError("x")), params, max_steps=6, gtol=0.0)
    partial = caught.value.partial_result
    assert partial.reason == "interrupted: RuntimeError" and partial.num_residual_evals > 0
    left = 6 - partial.num_steps
    resumed = sf.least_squares(
        residuals, partial.params, state=partial.state, max_steps=left, gtol=0.0
    )
    torch.testing.assert_close(resumed.params["x"], whole.params["x"], rtol=0, atol=1e-12)


def test_params_that_require_grad_come_back_as_plain_leaves():
    params = {k: v.clone().requires_grad_(True) for k, v in start().items()}
    result = sf.minimize(quadratic, params, sf.chain(sf.lbfgs(), sf.wolfe()))
    assert result.converged
    for leaf in tree.leaves(result.params):
        assert leaf.grad_fn is None and not leaf.requires_grad and leaf.is_leaf
    assert result.value.grad_fn is None
    assert all(leaf.requires_grad for leaf in tree.leaves(params))
    assert torch.equal(params["x"].detach(), start()["x"])


def test_gtol_rel_is_scale_free_and_gtol_stays_absolute():
    def tiny(p):
        return 1e-30 * quadratic(p)

    result = sf.minimize(tiny, start(), sf.chain(sf.lbfgs(), sf.wolfe()))
    assert result.reason == "gtol" and result.num_steps == 0  # the absolute rule, unchanged
    result = sf.minimize(tiny, start(), sf.sgd(1e29), gtol=0.0, gtol_rel=1e-8)
    g0 = float(tree.norm(sf.value_and_grad(tiny)(start())[1], math.inf))
    assert result.reason == "gtol_rel" and result.converged
    assert float(tree.norm(result.grad, math.inf)) <= 1e-8 * g0
    assert float(tree.norm(result.params, math.inf)) <= 1e-6


def test_a_returned_incumbent_comes_without_the_last_points_state():
    def loss(x):
        return (x**2).sum()

    start_x = torch.tensor([0.5], dtype=torch.float64)
    result = sf.minimize(loss, start_x + 1.0, _explorer(start_x), max_steps=3, gtol=1e-12)
    assert "incumbent" in result.reason and result.state is None
    assert "state is None" in result.reason
