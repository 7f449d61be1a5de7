"""The drivers: stopping rules, evaluation counts and reuse, non-finite values, least squares."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

import soo_func as sf
from soo_func import tree

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
