"""Driver stopping rules that involve rejected (zero) steps and xtol."""

from typing import NamedTuple

import torch

import soo_func as sf


class CountState(NamedTuple):
    count: torch.Tensor


def reject_every_other(step: float) -> sf.Transform:
    """A toy 'trust region': every other update is a rejected (zero) step."""

    def init(params):
        return CountState(torch.zeros((), dtype=torch.int64))

    def update(updates, state, params=None, **extra):
        reject = state.count % 2 == 0
        factor = torch.where(reject, 0.0, -step)
        return sf.tree.scale(factor, updates), CountState(state.count + 1)

    return sf.Transform(init, update)


def quadratic(p):
    return 0.5 * (p["x"] ** 2).sum()


def test_ftol_ignores_rejected_steps():
    params = {"x": torch.ones(3, dtype=torch.float64)}
    result = sf.minimize(quadratic, params, reject_every_other(0.5), ftol=1e-12, max_steps=40)
    assert result.num_steps > 2
    steps = [row["step_norm"] for row in result.history[1:]]
    assert steps[0] == 0.0 and steps[1] > 0.0
    assert result.value < 1e-6


def test_xtol_stops_on_small_accepted_steps():
    params = {"x": torch.ones(3, dtype=torch.float64)}
    result = sf.minimize(quadratic, params, sf.sgd(0.01), xtol=1e-3, gtol=0.0, max_steps=5000)
    assert result.reason == "xtol" and result.converged
    last = result.history[-1]
    assert last["step_norm"] <= 1e-3 * (float(sf.tree.norm(result.params)) + 1e-3)
    # without xtol the same run goes on to max_steps
    longer = sf.minimize(quadratic, params, sf.sgd(0.01), gtol=0.0, max_steps=300)
    assert longer.reason == "max_steps" and longer.num_steps == 300
