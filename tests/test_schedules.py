"""scale_by_schedule and cosine_decay_schedule: closed forms, purity, dtypes, devices,
placement before a line search, and the errors for bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_update_is_pure

import soo_func as sf


def _cosine(count: int, decay_steps: int, init_value: float, final_fraction: float) -> float:
    """Loshchilov & Hutter (2017) eq. 5 with eta_max = init_value, eta_min = final_fraction *
    init_value, T_cur = min(count, decay_steps), T_i = decay_steps."""
    low, high = final_fraction * init_value, init_value
    t = min(count, decay_steps)
    return low + 0.5 * (high - low) * (1 + math.cos(math.pi * t / decay_steps))


@pytest.mark.parametrize("final_fraction", [0.0, 0.1])
def test_cosine_decay_matches_the_closed_form(final_fraction):
    schedule = sf.cosine_decay_schedule(2.0, 8, final_fraction)
    for count in [0, 1, 2, 4, 7, 8, 9, 100]:
        got = float(schedule(torch.tensor(count)))
        assert got == pytest.approx(_cosine(count, 8, 2.0, final_fraction), rel=1e-12, abs=1e-15)
    assert float(schedule(torch.tensor(0))) == 2.0
    assert float(schedule(torch.tensor(4))) == pytest.approx(1.0 + final_fraction)
    assert float(schedule(torch.tensor(50))) == pytest.approx(2.0 * final_fraction, abs=1e-15)


def test_scale_by_schedule_multiplies_the_k_th_update_by_schedule_k(device):
    params = {"w": torch.ones(3, device=device), "b": torch.ones((), device=device)}
    grad = {
        "w": torch.tensor([1.0, -2.0, 3.0], device=device),
        "b": torch.tensor(4.0, device=device),
    }
    opt = sf.scale_by_schedule(sf.cosine_decay_schedule(1.0, 4))
    state = opt.init(params)
    assert state.count.device.type == torch.device(device).type
    for k in range(6):
        updates, state = opt.update(grad, state, params)
        factor = _cosine(k, 4, 1.0, 0.0)
        for name in grad:
            torch.testing.assert_close(updates[name], factor * grad[name])
        assert int(state.count) == k + 1


def test_scale_by_schedule_keeps_each_leaf_dtype_and_accepts_number_schedules():
    params = {"a": torch.ones(2, dtype=torch.float32), "b": torch.ones((), dtype=torch.float64)}
    opt = sf.scale_by_schedule(lambda count: 0.5)
    updates, _ = opt.update(params, opt.init(params), params)
    assert updates["a"].dtype == torch.float32 and updates["b"].dtype == torch.float64
    torch.testing.assert_close(updates["a"], torch.full((2,), 0.5))
    # a number schedule is exact for float64 leaves (0.1 is not a float32 number)
    opt = sf.scale_by_schedule(lambda count: 0.1)
    updates, _ = opt.update(params, opt.init(params), params)
    assert updates["b"].item() == 0.1
    # a float64 schedule value must not promote a 0-d float32 leaf
    opt = sf.scale_by_schedule(sf.cosine_decay_schedule(1.0, 3))
    zero_d = {"c": torch.tensor(2.0)}
    updates, _ = opt.update(zero_d, opt.init(zero_d), zero_d)
    assert updates["c"].dtype == torch.float32


def test_scale_by_schedule_is_pure():
    params = {"w": torch.randn(4)}
    assert_update_is_pure(
        sf.scale_by_schedule(sf.cosine_decay_schedule(1.0, 2)), params, {"w": torch.randn(4)}
    )


def test_before_a_search_the_published_point_is_the_step_taken():
    # Armijo on the scaled direction: its next_value is the objective at params + update,
    # and the step is the scaled unit step when that decreases enough.
    matrix = torch.diag(torch.tensor([1.0, 10.0]))

    def value_fn(p):
        return 0.5 * p["x"] @ matrix @ p["x"]

    params = {"x": torch.tensor([1.0, 1.0])}
    newton = sf.stateless(lambda g, p: {"x": -torch.linalg.solve(matrix, g["x"])})
    opt = sf.chain(newton, sf.scale_by_schedule(sf.cosine_decay_schedule(0.5, 4)), sf.armijo())
    state = opt.init(params)
    for k in range(3):
        value, grad = sf.value_and_grad(value_fn)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=value_fn)
        expected_step = -_cosine(k, 4, 0.5, 0.0) * params["x"]  # Newton step is -x here
        torch.testing.assert_close(updates["x"], expected_step)
        published = sf.publish(opt, state, params, value_fn=value_fn)
        params = sf.apply_updates(params, updates)
        torch.testing.assert_close(published["next_value"], value_fn(params))
        assert published["next_value"] < value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay_steps": 0}, "decay_steps must be a positive int"),
        ({"decay_steps": 2.5}, "decay_steps must be a positive int"),
        ({"decay_steps": True}, "decay_steps must be a positive int"),
        ({"decay_steps": 4, "final_fraction": 1.5}, "final_fraction must be in"),
        ({"decay_steps": 4, "init_value": math.nan}, "init_value must be finite"),
    ],
)
def test_cosine_decay_schedule_rejects_bad_arguments(kwargs, message):
    kwargs = {"init_value": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        sf.cosine_decay_schedule(**kwargs)


def test_scale_by_schedule_names_a_non_callable():
    with pytest.raises(TypeError, match="schedule must be a callable"):
        sf.scale_by_schedule(0.5)
