"""Data-parallel solves (issue 19): on 2 gloo ranks every family follows the single-process
trajectory on the whole data (values, params after every step, evaluation counts) to 1e-10
relative in float64; checkpoint/resume; a dead or absent rank; mismatched shards."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import soo_func as sf
from soo_func import distributed as sfd
from soo_func.stochastic import training

F64 = torch.float64
N_ROWS = 48
JOIN_TIMEOUT_S = 60.0


# ---- problems --------------------------------------------------------------------------


def _logistic_data():
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(N_ROWS, 4, generator=g, dtype=F64)
    y = (
        x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
        + torch.randn(N_ROWS, generator=g, dtype=F64)
        > 0
    )
    return x, y.to(F64)


def _logistic_params():
    return {"w": torch.zeros(4, dtype=F64), "b": torch.zeros((), dtype=F64)}


def _robust_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_ROWS, 4, generator=g, dtype=F64)
    noise = 0.3 * torch.randn(N_ROWS, generator=g, dtype=F64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64) + noise


def _robust_loss(params, data):
    """Cauchy-loss regression: nonconvex, so searches backtrack and trust regions reject."""
    x, y = data
    return torch.log1p((x @ params["w"] + params["b"] - y).square()).mean()


def _robust_params():
    return {"w": torch.ones(4, dtype=F64), "b": torch.ones((), dtype=F64)}


def _apply(params, x):
    return x @ params["w"] + params["b"]


def _output_loss(z, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


def _logistic_loss(params, batch):
    x, y = batch
    return _output_loss(_apply(params, x), y) + 5e-3 * params["w"].square().sum()


def _fit_data():
    t = torch.linspace(0.0, 1.0, N_ROWS, dtype=F64)
    return t, 2.0 * torch.exp(-1.3 * t) + 0.01 * torch.sin(7 * t)


def _fit_residuals(params, data):
    t, y = data
    return params["a"] * torch.exp(params["k"] * t) - y


def _fit_params():
    return {"a": torch.tensor(0.5, dtype=F64), "k": torch.tensor(2.0, dtype=F64)}


def _uneven_shard(data, rank, world):
    """Rank r's rows of an uneven split (rank r holds about (r + 1) / sum(1..R) of them)."""
    cut = [N_ROWS * r * (r + 1) // (world * (world + 1)) for r in range(world + 1)]
    return tuple(t[cut[rank] : cut[rank + 1]] for t in data)


def _shard(data, rank, world):
    rows = N_ROWS // world
    return tuple(t[rank * rows : (rank + 1) * rows] for t in data)


# ---- one scenario on one rank (world=1: the single-process reference) -------------------

MINIMIZE_CASES = {
    "lbfgs_wolfe": lambda: sf.chain(sf.lbfgs(), sf.wolfe()),
    "lbfgs_armijo": lambda: sf.chain(sf.lbfgs(), sf.armijo()),
    "bfgs_wolfe": lambda: sf.chain(sf.bfgs(), sf.wolfe()),
    "newton_trust_region": lambda: sf.chain(
        sf.newton_krylov(), sf.trust_region(initial_radius=10.0)
    ),
}
LEAST_SQUARES_CASES = {
    "gauss_newton_armijo": lambda: sf.chain(sf.gauss_newton(), sf.armijo()),
    "levenberg_cg": lambda: sf.levenberg(solver="cg", initial_damping=1e-6),
    "levenberg_marquardt_dense": lambda: sf.levenberg_marquardt(),
    "levenberg_marquardt_cg": lambda: sf.levenberg_marquardt(solver="cg"),
}


def _trajectory(result, params_seen):
    return {"history": result.history, "params": params_seen, "counts": _counts(result)}


def _counts(result):
    return [
        result.num_value_evals,
        result.num_grad_evals,
        result.num_hvp_evals,
        result.num_residual_evals,
    ]


def _minimize_case(name, rank, world, steps=6, state=None, params=None):
    data = _shard(_robust_data(), rank, world)
    value_fn = sfd.data_parallel(_robust_loss, reduce="mean").bind(data) if world > 1 else None
    seen = []
    result = sf.minimize(
        value_fn or (lambda p: _robust_loss(p, data)), params or _robust_params(),
        MINIMIZE_CASES[name](), max_steps=steps, gtol=1e-12, state=state,
        callback=lambda row, p: seen.append(p),
    )  # fmt: skip
    return result, _trajectory(result, seen)


def _least_squares_case(name, rank, world, steps=5):
    """sf.least_squares on one rank, and on several with the sharded residual_fn (its
    args bound by the driver)."""
    data = _uneven_shard(_fit_data(), rank, world)
    seen = []
    kwargs = {"max_steps": steps, "gtol": 1e-12, "callback": lambda row, p: seen.append(p)}
    if world == 1:
        residual_fn = lambda p: _fit_residuals(p, data)  # noqa: E731
        result = sf.least_squares(residual_fn, _fit_params(), LEAST_SQUARES_CASES[name](), **kwargs)
        return _trajectory(result, seen)
    residuals = sfd.sharded_residuals(_fit_residuals)
    result = sf.least_squares(
        residuals, _fit_params(), LEAST_SQUARES_CASES[name](), args=(data,), **kwargs
    )
    return _trajectory(result, seen)


def _hessian_free_case(rank, world, steps=4):
    """training_step's body on batches of 12 rows, each rank holding half of each batch,
    the curvature the GGN of the batch (reduced too)."""
    opt = sf.hessian_free(max_cg_iters=6)
    params, state, rows = _logistic_params(), None, []
    state = opt.init(params)
    apply_fn = sfd.sharded_residuals(_apply, reduce="mean") if world > 1 else _apply
    loss = sfd.data_parallel(_logistic_loss, reduce="mean") if world > 1 else None
    for k in range(steps):
        batch = tuple(t[12 * k : 12 * (k + 1)] for t in _logistic_data())
        x, y = batch = tuple(t[rank * 12 // world : (rank + 1) * 12 // world] for t in batch)
        curvature = training.ggn_operator(apply_fn, _output_loss, params, (x, y))
        value_fn = (lambda p, b=batch: _logistic_loss(p, b)) if world == 1 else loss.bind(batch)
        value, grad = sf.value_and_grad(value_fn)(params)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=value_fn, curvature=curvature
        )
        params = sf.apply_updates(params, updates)
        rows.append(
            {
                "value": value,
                "params": params,
                "damping": state.damping,
                "rho": state.reduction_ratio,
            }
        )
    return rows


def _resume_case(rank, world, path):
    """3 steps, rank 0 saves (params, state), all ranks resume for 3 more."""
    first, _ = _minimize_case("lbfgs_wolfe", rank, world, steps=3)
    if rank == 0:
        torch.save({"params": first.params, "state": first.state}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=False)
    _, trajectory = _minimize_case(
        "lbfgs_wolfe", rank, world, steps=3, state=saved["state"], params=saved["params"]
    )
    return trajectory["params"]


def _error_of(thunk):
    try:
        thunk()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _scenarios(rank, world, out_dir):
    results = {name: _minimize_case(name, rank, world)[1] for name in MINIMIZE_CASES}
    results["collectives"] = _collectives_per_oracle_call(rank, world)
    results |= {name: _least_squares_case(name, rank, world) for name in LEAST_SQUARES_CASES}
    results["hessian_free"] = _hessian_free_case(rank, world)
    results["resume"] = _resume_case(rank, world, Path(out_dir) / "checkpoint.pt")
    results["routes"] = _driver_routes(rank, world)
    bad = (
        _robust_params()
        if rank == 0
        else {"w": torch.zeros(4, dtype=torch.float32), "b": torch.zeros((), dtype=F64)}
    )
    data = _shard(_robust_data(), rank, world)
    results["mismatch"] = _error_of(lambda: sfd.data_parallel(_robust_loss)(bad, data))
    return results


def _collectives_per_oracle_call(rank, world):
    """(oracle calls, all-reduces) of an lbfgs+wolfe solve on the sharded objective."""
    value_fn = sfd.data_parallel(_robust_loss).bind(_shard(_robust_data(), rank, world))
    result = sf.minimize(value_fn, _robust_params(), sf.chain(sf.lbfgs(), sf.wolfe()), max_steps=6)
    return result.num_value_evals, result.num_grad_evals, value_fn.num_collectives


def _driver_routes(rank, world):
    """``minimize(args=)`` on a data_parallel objective and ``least_squares`` on sharded
    residuals against the same solves with ``.bind``: (value by args, value by bind)."""
    data = _shard(_robust_data(), rank, world)
    fit = _shard(_fit_data(), rank, world)
    value_fn = sfd.data_parallel(_robust_loss)
    residuals = sfd.sharded_residuals(_fit_residuals)
    by_args = sf.minimize(value_fn, _robust_params(), sf.chain(sf.lbfgs(), sf.wolfe()),
                          args=(data,), max_steps=3)  # fmt: skip
    by_bind = sf.minimize(value_fn.bind(data), _robust_params(), sf.chain(sf.lbfgs(), sf.wolfe()),
                          max_steps=3)  # fmt: skip
    bound = residuals.bind(fit)
    ls_args = sf.least_squares(residuals, _fit_params(), sf.levenberg(), args=(fit,), max_steps=3)
    ls_bind = sf.minimize(bound.objective, _fit_params(), sf.levenberg(),
                          extra={"residual_fn": sf.CountedObjective(bound)}, max_steps=3)  # fmt: skip
    return [(float(a.value), float(b.value)) for a, b in ((by_args, by_bind), (ls_args, ls_bind))]


# ---- spawning ----------------------------------------------------------------------------


def _save_result(rank, world, out_dir, job):
    """Run ``job`` on this rank and save what it returns (its traceback when it raises)."""
    try:
        out = job(rank, world, out_dir)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    if job in ABRUPT_JOBS:  # the group is broken: no orderly shutdown
        os._exit(0)


def _spawn(job, out_dir, world=2, timeout=JOIN_TIMEOUT_S):
    """Run ``job(rank, world, out_dir)`` on ``world`` gloo ranks; kill them all after ``timeout``."""
    return sfd.run_local(_save_result, world, str(out_dir), job, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    codes = _spawn(_scenarios, out)
    errors = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
    assert codes == [0, 0], f"exit codes {codes} (negative: killed at the deadline)\n{errors}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ---- comparisons -------------------------------------------------------------------------


def _close(a, b, path="", rtol=1e-10):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", rtol)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]", rtol)
    else:
        x, y = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-6), f"{path}: {a} vs {b}"


@pytest.mark.parametrize("name", [*MINIMIZE_CASES, *LEAST_SQUARES_CASES])
def test_trajectory_matches_single_process(two_ranks, name):
    if name in MINIMIZE_CASES:
        reference = _minimize_case(name, 0, 1)[1]
    else:
        reference = _least_squares_case(name, 0, 1)
    assert len(reference["history"]) > 3
    for rank in range(2):
        _close(two_ranks[rank][name], reference, name)
        assert two_ranks[rank][name]["counts"] == reference["counts"]


def test_runs_exercise_backtracking_and_rejection():
    armijo = _minimize_case("lbfgs_armijo", 0, 1)[1]["history"]
    assert any(row["num_search_evals"] > 2 for row in armijo[1:]), armijo
    trust = _minimize_case("newton_trust_region", 0, 1)[1]["history"]
    assert any(row["step_accepted"] == 0.0 for row in trust[1:]), trust


def test_hessian_free_on_sharded_batches(two_ranks):
    reference = _hessian_free_case(0, 1)
    for rank in range(2):
        _close(two_ranks[rank]["hessian_free"], reference, "hessian_free")


def test_checkpoint_resume_continues_the_trajectory(two_ranks):
    straight = _minimize_case("lbfgs_wolfe", 0, 1, steps=6)[1]["params"]
    assert len(straight) == 6
    for rank in range(2):
        _close(two_ranks[rank]["resume"], straight[3:], "resume")


def test_one_all_reduce_per_oracle_call(two_ranks):
    for rank in range(2):
        values, grads, collectives = two_ranks[rank]["collectives"]
        assert values == grads == collectives > 6


def test_the_drivers_bind_args_of_sharded_functions(two_ranks):
    """``minimize(args=)`` and ``least_squares`` keep a sharded function sharded: the same
    values as the ``.bind`` routes, on every rank."""
    for rank in range(2):
        for by_args, by_bind in two_ranks[rank]["routes"]:
            assert by_args == by_bind


def test_a_group_is_required_and_reduce_is_checked():
    with pytest.raises(ValueError, match="reduce must be one of"):
        sfd.data_parallel(_robust_loss, reduce="max")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            sfd.data_parallel(_robust_loss)


@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="4 ranks need 4 cores")
def test_four_ranks_follow_the_single_process_trajectory(tmp_path):
    assert _spawn(_four_rank_cases, tmp_path, world=4) == [0] * 4
    for rank in range(4):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        _close(got["lbfgs_wolfe"], _minimize_case("lbfgs_wolfe", 0, 1)[1], "lbfgs_wolfe")
        _close(got["gauss_newton_armijo"], _least_squares_case("gauss_newton_armijo", 0, 1), "gn")


def _four_rank_cases(rank, world, out_dir):
    return {
        "lbfgs_wolfe": _minimize_case("lbfgs_wolfe", rank, world)[1],
        "gauss_newton_armijo": _least_squares_case("gauss_newton_armijo", rank, world),
    }


def test_mismatched_shards_get_a_clear_error(two_ranks):
    for rank in range(2):
        message = two_ranks[rank]["mismatch"]
        assert (
            message.startswith("DistributedOracleError")
            and "float32" in message
            and "rank 1" in message
        )


def _dies_on_third_value(rank, world, out_dir, hang=False):
    calls = [0]
    data = _shard(_logistic_data(), rank, world)

    def local(params, batch):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            if hang:
                time.sleep(4.5)
            raise RuntimeError("rank 1 fails")
        return _logistic_loss(params, batch)

    start = time.monotonic()
    value_fn = sfd.data_parallel(local, timeout=2.0).bind(data)

    def solve():
        return sf.minimize(value_fn, _logistic_params(), sf.chain(sf.lbfgs(), sf.wolfe()))

    message = solve() if rank == 1 else _error_of(solve)  # rank 1 raises out of its process
    return {"message": message, "elapsed": time.monotonic() - start}


def _hangs_on_third_value(rank, world, out_dir):
    return _dies_on_third_value(rank, world, out_dir, hang=True)


ABRUPT_JOBS = (_dies_on_third_value, _hangs_on_third_value)


@pytest.mark.parametrize("job", ABRUPT_JOBS)
def test_a_dead_rank_makes_the_survivor_fail_within_the_timeout(tmp_path, job):
    codes = _spawn(job, tmp_path, timeout=25.0)
    assert codes[1] != 0
    survivor = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert survivor["message"].startswith("DistributedOracleError"), survivor
    assert "rank 0 of 2" in survivor["message"]
    assert survivor["elapsed"] < 2.0 + 10.0
