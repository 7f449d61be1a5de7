"""The sync-free driver (``check_every=None`` / ``k``, ``compile=True``) and batched solves
(issue 17): no host read inside a run, vmapped solves equal per-problem solves (and those
equal the host driver's), ``check_every=k`` stops within ``k`` steps of convergence, and a
compiled step gives the eager result."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch

import soo_func as sf
from soo_func.drivers import compiled_step
from soo_func.drivers.stopping import MAX_FAILED_SEARCHES
from soo_func.drivers.sync_free import REASON_NAMES, reason_names

F64 = torch.float64
T = torch.linspace(0.0, 1.0, 16, dtype=F64)


def decay(p: torch.Tensor) -> torch.Tensor:
    """``a exp(-b t) + c``."""
    return p[0] * torch.exp(-p[1] * T) + p[2]


def residual(p: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return decay(p) - data


def loss(p: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    return 0.5 * (residual(p, data) ** 2).sum()


def rosenbrock(p: torch.Tensor) -> torch.Tensor:
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


TRUTHS = torch.tensor(
    [[2.0, 3.0, 0.5], [1.0, 0.5, 0.0], [3.0, 6.0, -1.0], [1.5, 2.0, 0.2]], dtype=F64
)
NOISE = 0.01 * torch.sin(7.0 * T)
DATAS = torch.stack([decay(p) for p in TRUTHS[:3]] + [decay(TRUTHS[3])])
DATAS[:3] += NOISE  # the last problem is noise-free and starts at its solution: stopped at step 0
X0S = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [1.5, 2.0, 0.2]], dtype=F64)
STARTS = torch.tensor([[-1.2, 1.0], [0.5, 0.5], [2.0, 3.0], [-0.5, 2.0]], dtype=F64)


def lbfgs_chain():
    return sf.chain(sf.lbfgs(), sf.armijo_sync_free())


def bfgs_chain():
    return sf.chain(sf.bfgs(), sf.armijo_sync_free())


def gauss_newton_chain():
    return sf.chain(sf.gauss_newton(), sf.armijo_sync_free())


def bfgs_trust_region():
    return sf.chain(sf.bfgs(), sf.trust_region())


# name -> (least squares?, optimizer factory, max_steps); each solves the four fits above
CASES = {
    "lbfgs": (False, lbfgs_chain, 80),
    "bfgs": (False, bfgs_chain, 80),
    "gauss_newton": (True, gauss_newton_chain, 40),
    "levenberg_marquardt": (True, sf.levenberg_marquardt, 40),
    "trust_region": (False, bfgs_trust_region, 80),
}

CASE_PARAMS = list(CASES)


def solve_one(name: str, x0: torch.Tensor, data: torch.Tensor, **kwargs) -> sf.MinimizeResult:
    is_lsq, make, max_steps = CASES[name]
    kwargs.setdefault("max_steps", max_steps)
    if is_lsq:
        return sf.least_squares(residual, x0, make(), args=(data,), **kwargs)
    return sf.minimize(loss, x0, make(), args=(data,), **kwargs)


def solve_batch(name: str, **kwargs) -> sf.MinimizeResult:
    is_lsq, make, max_steps = CASES[name]
    kwargs.update(args=(DATAS,), max_steps=max_steps)
    if is_lsq:
        return sf.batched_least_squares(residual, X0S, make(), **kwargs)
    return sf.batched_minimize(loss, X0S, make(), **kwargs)


# ----------------------------------------------------------------------- no host read


@pytest.fixture
def no_host_reads(monkeypatch):
    """A context in which reading a tensor on the host raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in the sync-free driver")

    class Patched:
        def __enter__(self):
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                monkeypatch.setattr(torch.Tensor, name, refuse)

        def __exit__(self, *exc):
            monkeypatch.undo()

    return Patched()


@pytest.mark.parametrize("name", ["lbfgs", "gauss_newton", "levenberg_marquardt"])
def test_sync_free_run_reads_nothing_on_the_host(name, no_host_reads):
    is_lsq, make, max_steps = CASES[name]
    x0, data, optimizer = X0S[0].clone(), DATAS[0].clone(), make()
    objective = residual if is_lsq else loss
    driver = sf.least_squares if is_lsq else sf.minimize
    with no_host_reads:
        result = driver(
            objective, x0, optimizer, args=(data,), max_steps=max_steps, check_every=None
        )
    assert isinstance(result.converged, torch.Tensor) and bool(result.converged)
    assert isinstance(result.num_steps, torch.Tensor) and 0 < int(result.num_steps) < max_steps
    assert reason_names(result) == "gtol" and result.history == []


def test_non_finite_start_is_marked_failed_without_a_host_read(no_host_reads):
    x0 = torch.tensor([math.nan, 1.0, 0.0], dtype=F64)
    optimizer = lbfgs_chain()
    with no_host_reads:
        result = sf.minimize(loss, x0, optimizer, args=(DATAS[0],), max_steps=5, check_every=None)
    assert not bool(result.converged) and int(result.num_steps) == 0
    assert reason_names(result) == "non_finite_start"


# ------------------------------------------------------------- batched = per problem


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_vmapped_solves_equal_per_problem_solves(name):
    batched = solve_batch(name)
    steps = batched.num_steps.tolist()
    assert len(set(steps)) > 2 and steps[-1] == 0  # members stop at different steps
    assert batched.converged.all()
    for i in range(len(X0S)):
        alone = solve_one(name, X0S[i], DATAS[i], check_every=None)
        torch.testing.assert_close(batched.params[i], alone.params, rtol=0, atol=1e-10)
        torch.testing.assert_close(batched.value[i], alone.value, rtol=0, atol=1e-10)
        assert int(alone.num_steps) == steps[i]
        assert int(alone.reason_code) == int(batched.reason_code[i])
        host = solve_one(name, X0S[i], DATAS[i])  # the host driver: the same trajectory
        torch.testing.assert_close(host.params, alone.params, rtol=0, atol=1e-8)
        assert host.num_steps == steps[i] and host.converged
        assert host.reason == REASON_NAMES[int(alone.reason_code)]


@pytest.mark.parametrize("name", ["gauss_newton", "levenberg_marquardt"])
def test_the_issue_pattern_vmap_over_least_squares(name):
    _, make, _ = CASES[name]

    def fit(x0, data):
        result = sf.least_squares(
            partial(residual, data=data), x0, make(), max_steps=50, check_every=None
        )
        return result.params

    params = torch.func.vmap(fit)(X0S, DATAS)
    for i in range(len(X0S)):
        alone = sf.least_squares(partial(residual, data=DATAS[i]), X0S[i], make(), max_steps=50)
        torch.testing.assert_close(params[i], alone.params, rtol=0, atol=1e-8)


def test_multi_start_lbfgs_on_rosenbrock():
    batched = sf.batched_minimize(rosenbrock, STARTS, lbfgs_chain(), max_steps=150)
    assert len(set(batched.num_steps.tolist())) > 1 and batched.converged.all()
    for i in range(len(STARTS)):
        alone = sf.minimize(rosenbrock, STARTS[i], lbfgs_chain(), max_steps=150, check_every=None)
        torch.testing.assert_close(batched.params[i], alone.params, rtol=0, atol=1e-10)
        host = sf.minimize(rosenbrock, STARTS[i], lbfgs_chain(), max_steps=150)
        torch.testing.assert_close(host.params, alone.params, rtol=0, atol=1e-8)
        assert host.num_steps == int(alone.num_steps)
    torch.testing.assert_close(batched.params, torch.ones_like(STARTS), rtol=0, atol=1e-4)


def test_batched_result_carries_a_batched_state_and_counts():
    batched = solve_batch("lbfgs", compact_every=None)  # lockstep: every step for all
    leaves = [x for x in sf.tree.leaves(batched.state) if isinstance(x, torch.Tensor)]
    assert leaves and all(x.shape[:1] == (len(X0S),) for x in leaves)
    # every problem runs every step: a start, then per step 8 trial values and one gradient
    assert batched.num_grad_evals == 1 + 80 and batched.num_value_evals == 1 + 80 * 9


@pytest.mark.parametrize("name", ["lbfgs", "gauss_newton", "levenberg_marquardt"])
def test_counts_of_the_steps_run_equal_the_host_driver_counts(name):
    """Run for exactly the host run's steps, the sync-free driver counts what it does
    (including least_squares' residual evaluations, counted through the steps' twins);
    Levenberg-Marquardt reuses its cached Jacobian from the second step on (the driver's
    ``continues`` promise), as the host driver does after its check."""
    host = solve_one(name, X0S[0], DATAS[0])
    free = solve_one(name, X0S[0], DATAS[0], max_steps=host.num_steps, check_every=None)
    counts = ("num_value_evals", "num_grad_evals", "num_hvp_evals", "num_residual_evals")
    assert [getattr(free, c) for c in counts] == [getattr(host, c) for c in counts]


# ------------------------------------------------------------------ freezing, stops


def test_a_non_finite_value_freezes_at_the_last_finite_point():
    def wall(p):  # NaN beyond x = 3.5
        return torch.where(p[0] > 3.5, torch.nan, (p**2).sum())

    x0 = torch.tensor([1.0, 0.0], dtype=F64)
    optimizer = sf.scale(0.5)  # x + grad / 2 = 2 x: an ascent that walks into the wall at 4
    host = sf.minimize(wall, x0, optimizer, max_steps=10)
    free = sf.minimize(wall, x0, optimizer, max_steps=10, check_every=None)
    assert host.reason.startswith("non-finite value")
    assert reason_names(free) == "non_finite_value" and not bool(free.converged)
    torch.testing.assert_close(free.params, host.params, rtol=0, atol=0)
    assert int(free.num_steps) == host.num_steps == 2


def test_failed_searches_stop_like_the_host_driver():
    """A search that always fails (an ascent direction) stops both drivers at the same step."""
    optimizer = sf.chain(sf.scale(1.0), sf.armijo_sync_free())
    x0 = torch.tensor([1.0, 2.0], dtype=F64)
    host = sf.minimize(lambda p: (p**2).sum(), x0, optimizer, max_steps=50)
    free = sf.minimize(lambda p: (p**2).sum(), x0, optimizer, max_steps=50, check_every=None)
    assert host.reason.startswith("search_failed") and not host.converged
    assert reason_names(free).startswith("search_failed") and not bool(free.converged)
    assert int(free.num_steps) == host.num_steps <= MAX_FAILED_SEARCHES
    torch.testing.assert_close(free.params, host.params, rtol=0, atol=0)


@pytest.mark.parametrize("every", [2, 5])
def test_check_every_k_stops_within_k_steps_of_convergence(every):
    free = sf.minimize(
        loss, X0S[0], lbfgs_chain(), args=(DATAS[0],), max_steps=80, check_every=None
    )
    checked = sf.minimize(
        loss, X0S[0], lbfgs_chain(), args=(DATAS[0],), max_steps=80, check_every=every
    )
    stopped_at = int(free.num_steps)
    ran = checked.num_grad_evals - 1  # one gradient a step (and one at the start)
    assert stopped_at <= ran < stopped_at + every and ran % every == 0
    assert int(checked.num_steps) == stopped_at and bool(checked.converged)
    torch.testing.assert_close(checked.params, free.params, rtol=0, atol=0)


def test_sync_free_options_are_checked():
    with pytest.raises(ValueError, match="check_every"):
        sf.minimize(loss, X0S[0], lbfgs_chain(), args=(DATAS[0],), check_every=0)
    with pytest.raises(ValueError, match="callback"):
        sf.minimize(loss, X0S[0], lbfgs_chain(), args=(DATAS[0],), check_every=None, callback=print)


# -------------------------------------------------------------------------- compile


def test_compiled_step_gives_the_eager_result():
    def optimizer():
        return sf.chain(sf.bfgs(), sf.armijo_sync_free(max_steps=2))

    eager = sf.minimize(loss, X0S[0], optimizer(), args=(DATAS[0],), max_steps=40, check_every=None)
    torch.compiler.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = sf.minimize(
                loss, X0S[0], optimizer(), args=(DATAS[0],), max_steps=40, check_every=None,
                compile=True,
            )  # fmt: skip
    finally:
        torch.compiler.reset()
    assert not [w for w in caught if "one graph" in str(w.message)]  # fullgraph held
    torch.testing.assert_close(compiled.params, eager.params, rtol=0, atol=1e-10)
    assert int(compiled.num_steps) == int(eager.num_steps) and bool(compiled.converged)
    # Compiled, armijo_sync_free branches with torch.cond: it evaluates fewer trials than
    # eager (all of them). The branches charge no host counter; the search publishes them
    # as uncharged_evals, which the driver adds: the start, then at least one value and
    # gradient per step the loop ran (frozen steps too), and never fewer values than
    # gradients.
    assert compiled.num_value_evals < eager.num_value_evals
    assert compiled.num_grad_evals >= 1 + 40
    assert compiled.num_value_evals >= compiled.num_grad_evals


# -------------------------------------------------------------------------- flat vectors


def pytree_quadratic(p: dict) -> torch.Tensor:
    """A separable quadratic on a dict of three tensors (the search then works on flat
    vectors: one dtype, one device)."""
    return sum(0.5 * (i + 1.0) * ((v - 1.0) ** 2).sum() for i, v in enumerate(p.values()))


PYTREE_X0 = {"a": torch.zeros(3, 2, dtype=F64), "b": torch.zeros(4, dtype=F64),
             "c": torch.zeros((), dtype=F64)}  # fmt: skip


@pytest.mark.parametrize("direction", [sf.lbfgs, sf.dfp])
def test_limited_memory_publishes_the_flat_vectors_of_its_step(direction):
    opt = direction(memory_size=3) if direction is sf.dfp else direction(3)
    grad = {k: torch.randn_like(v) for k, v in PYTREE_X0.items()}
    updates, _, published = sf.update_and_publish(opt, grad, opt.init(PYTREE_X0), PYTREE_X0)
    flat = published["flat_step"]
    assert flat.describes(PYTREE_X0, grad, updates)
    for vector, pytree in ((flat.x, PYTREE_X0), (flat.g, grad), (flat.d, updates)):
        torch.testing.assert_close(vector, sf.tree.ravel(pytree).flat, rtol=0, atol=0)
    storage = flat.d.untyped_storage().data_ptr()
    assert all(u.untyped_storage().data_ptr() == storage for u in sf.tree.leaves(updates))
    assert not flat.describes(PYTREE_X0, grad, sf.tree.scale(1.0, updates))  # new leaves


@pytest.mark.parametrize("between", [(), (sf.scale(0.5),)])
def test_a_compiled_search_reuses_only_the_flat_vectors_of_its_own_trees(between, monkeypatch):
    """With a member between the direction and the search (it makes new updates), the
    published vectors are not those of the search's updates: the compiled search ravels
    its own (reusing the direction's would step along the unscaled direction)."""
    monkeypatch.setattr(compiled_step, "blas_inductor", "eager")  # the graph is what counts

    def optimizer():
        return sf.chain(sf.lbfgs(3), *between, sf.armijo_sync_free(max_steps=3))

    eager = sf.minimize(pytree_quadratic, PYTREE_X0, optimizer(), max_steps=12, check_every=None)
    torch.compiler.reset()
    try:
        compiled = sf.minimize(
            pytree_quadratic, PYTREE_X0, optimizer(), max_steps=12, check_every=None, compile=True
        )
    finally:
        torch.compiler.reset()
    torch.testing.assert_close(compiled.params, eager.params, rtol=0, atol=1e-12)
    assert int(compiled.num_steps) == int(eager.num_steps)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_in_the_sync_free_loop_carries_the_last_completed_step(error):
    """The objective raises in the middle of a step: the exception comes with the run up to
    the last completed step (``err.partial_result``), and resuming from it with its state
    finishes on the uninterrupted run's path."""

    calls = [0]

    def fails_at_call_25(p):
        calls[0] += 1
        if calls[0] == 25:
            raise error
        return rosenbrock(p)

    params = torch.tensor([-1.2, 1.0], dtype=F64)
    opt = sf.chain(sf.lbfgs(), sf.armijo_sync_free())
    options = dict(max_steps=12, gtol=0.0, check_every=None)
    whole = sf.minimize(rosenbrock, params, opt, **options)
    with pytest.raises(type(error)) as caught:
        sf.minimize(fails_at_call_25, params, opt, **options)
    partial = caught.value.partial_result
    assert partial.reason == f"interrupted: {type(error).__name__}" and not partial.converged
    taken = int(partial.num_steps)
    assert 0 < taken < 12 and partial.num_value_evals >= 24
    assert float(partial.value) == float(rosenbrock(partial.params))
    alone = sf.minimize(rosenbrock, params, opt, **{**options, "max_steps": taken})
    torch.testing.assert_close(partial.params, alone.params, rtol=0, atol=0)
    resumed = sf.minimize(
        rosenbrock, partial.params, opt, state=partial.state,
        **{**options, "max_steps": 12 - taken},
    )  # fmt: skip
    torch.testing.assert_close(resumed.params, whole.params, rtol=0, atol=1e-12)
