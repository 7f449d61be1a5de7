"""Batched solves with compaction (``compact_every=k``, :mod:`soo_func.drivers.batched_loop`):
dropping the stopped problems between rounds changes no result (float64, 1e-10 against the
lockstep run and the per-problem sync-free solves, members stopping at different steps), the
counts are those of the steps the loop ran, and a later round continues the Jacobian cache
(no re-evaluation)."""

from __future__ import annotations

import math

import pytest
import torch
from test_sync_free import (
    CASES,
    DATAS,
    STARTS,
    X0S,
    residual,
    rosenbrock,
    solve_batch,
    solve_one,
)

import soo_func as sf
from soo_func.drivers import batched_loop


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name", ["levenberg_marquardt", "lbfgs", "gauss_newton"])
def test_compaction_equals_the_lockstep_and_per_problem_solves(name, every):
    lockstep = solve_batch(name, compact_every=None)
    compacted = solve_batch(name, compact_every=every)
    steps = compacted.num_steps.tolist()
    assert len(set(steps)) > 2 and steps[-1] == 0  # members stop at different steps
    assert steps == lockstep.num_steps.tolist()
    assert compacted.reason_code.tolist() == lockstep.reason_code.tolist()
    torch.testing.assert_close(compacted.params, lockstep.params, rtol=0, atol=1e-10)
    torch.testing.assert_close(compacted.value, lockstep.value, rtol=0, atol=1e-10)
    torch.testing.assert_close(compacted.grad_norm, lockstep.grad_norm, rtol=0, atol=1e-10)
    for i in range(len(X0S)):
        alone = solve_one(name, X0S[i], DATAS[i], check_every=None)
        torch.testing.assert_close(compacted.params[i], alone.params, rtol=0, atol=1e-10)
        assert int(alone.num_steps) == steps[i]


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("name", ["levenberg_marquardt", "lbfgs"])
def test_counts_are_those_of_the_steps_the_loop_ran(name, every):
    """The loop stops at the first read that finds every problem stopped; a problem that
    ran those steps alone counts the same (so a later round reuses LM's cached Jacobian)."""
    compacted = solve_batch(name, compact_every=every)
    longest = max(compacted.num_steps.tolist())
    ran = min(every * math.ceil(longest / every), CASES[name][2])
    alone = solve_one(name, X0S[0], DATAS[0], max_steps=ran, check_every=None)
    counts = ("num_value_evals", "num_grad_evals", "num_hvp_evals", "num_residual_evals")
    assert [getattr(compacted, c) for c in counts] == [getattr(alone, c) for c in counts]


def test_shared_arguments_and_multistart_with_compaction():
    def shifted(p, shift):
        return rosenbrock(p - shift)

    shift = torch.tensor([0.5, -0.5], dtype=torch.float64)
    chain = sf.chain(sf.lbfgs(), sf.armijo_sync_free())
    batched = sf.batched_minimize(
        shifted, STARTS, chain, args=(shift,), args_dims=None, max_steps=150, compact_every=5
    )
    assert len(set(batched.num_steps.tolist())) > 1 and batched.converged.all()
    for i in range(len(STARTS)):
        alone = sf.minimize(
            shifted, STARTS[i], chain, args=(shift,), max_steps=150, check_every=None
        )
        torch.testing.assert_close(batched.params[i], alone.params, rtol=0, atol=1e-10)


def test_compact_every_is_checked():
    with pytest.raises(ValueError, match="compact_every"):
        solve_batch("lbfgs", compact_every=0)
    with pytest.raises(TypeError, match="unexpected"):
        solve_batch("lbfgs", gtoll=1e-3)


@pytest.mark.parametrize("below", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", ["levenberg_marquardt", "lbfgs"])
def test_compaction_threshold_changes_no_result(name, below, monkeypatch):
    """``COMPACT_BELOW`` 0 never compacts (the stopped problems stay in the rounds, frozen),
    1 compacts at every read: the results equal the lockstep run either way."""
    lockstep = solve_batch(name, compact_every=None)
    monkeypatch.setattr(batched_loop, "COMPACT_BELOW", below)
    compacted = solve_batch(name, compact_every=1)
    assert compacted.num_steps.tolist() == lockstep.num_steps.tolist()
    assert compacted.reason_code.tolist() == lockstep.reason_code.tolist()
    torch.testing.assert_close(compacted.params, lockstep.params, rtol=0, atol=1e-10)
    torch.testing.assert_close(compacted.grad_norm, lockstep.grad_norm, rtol=0, atol=1e-10)


def test_an_exception_in_a_batched_solve_carries_the_last_completed_round():
    """The residuals raise at a later round: ``err.partial_result`` is the batch after the
    rounds before it, the params of a run stopped after as many steps."""
    calls = [0]

    def fails_at_call_6(p, y):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return residual(p, y)

    options = dict(args=(DATAS,), max_steps=40, compact_every=1)
    with pytest.raises(KeyboardInterrupt) as caught:
        sf.batched_least_squares(fails_at_call_6, X0S, sf.levenberg_marquardt(), **options)
    partial = caught.value.partial_result
    assert partial.reason == "interrupted: KeyboardInterrupt" and partial.converged is False
    taken = int(partial.num_steps.max())
    assert 0 < taken < 40 and partial.params.shape == X0S.shape
    shorter = sf.batched_least_squares(
        residual, X0S, sf.levenberg_marquardt(), **{**options, "max_steps": taken}
    )
    torch.testing.assert_close(partial.params, shorter.params, rtol=0, atol=0)
    torch.testing.assert_close(partial.num_steps, shorter.num_steps, rtol=0, atol=0)
