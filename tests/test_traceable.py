"""Traceable transforms: one update (and three in a row) under ``torch.compile(fullgraph=True)``
and under ``torch.func.vmap`` gives the eager result.

The compile cases use the ``aot_eager`` backend (dynamo's full-graph capture and AOT
tracing, without inductor's C++ code generation, which would cost minutes per chain on one
core); all are marked ``slow``. A default run compiles three representative chains (a
quasi-Newton with the sync-free search, Newton-Krylov with a trust region, dense
Levenberg-Marquardt); ``SOO_FUNC_FULL_COMPILE=1`` compiles every chain and one with inductor. The vmap cases batch three
problems: three starting points and three data sets bound through a vmapped argument.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

import soo_func as sf
from soo_func.searches.armijo import compiles_control_flow

D = torch.float64
N_STEPS = 3


def residual(data: tuple[torch.Tensor, torch.Tensor], params: dict) -> torch.Tensor:
    """A small nonlinear least-squares model: ``A x - y`` and ``0.3 x^2`` (x = [w; b])."""
    a, y = data
    x = torch.cat([params["w"], params["b"]])
    return torch.cat([a @ x - y, 0.3 * x**2])


def loss(data, params: dict) -> torch.Tensor:
    r = residual(data, params)
    return 0.5 * (r * r).sum()


def make_data(batch: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    a = torch.randn(*shape, 8, 6, generator=gen, dtype=D)
    y = torch.randn(*shape, 8, generator=gen, dtype=D)
    w = 0.5 + 0.3 * torch.randn(*shape, 4, generator=gen, dtype=D)
    b = -0.2 + 0.3 * torch.randn(*shape, 2, generator=gen, dtype=D)
    return (a, y), {"w": w, "b": b}


CASES = {
    "lbfgs+armijo_sync_free": lambda: sf.chain(sf.lbfgs(memory_size=3), sf.armijo_sync_free()),
    "bfgs+armijo_sync_free": lambda: sf.chain(sf.bfgs(), sf.armijo_sync_free()),
    "bfgs(m=3)+armijo_sync_free": lambda: sf.chain(sf.bfgs(memory_size=3), sf.armijo_sync_free()),
    "dfp+armijo_sync_free": lambda: sf.chain(sf.dfp(), sf.armijo_sync_free()),
    "ssbfgs+armijo_sync_free": lambda: sf.chain(sf.ssbfgs(), sf.armijo_sync_free()),
    "ssbroyden+armijo_sync_free": lambda: sf.chain(sf.ssbroyden(), sf.armijo_sync_free()),
    "ssbfgs(m=3)+armijo_sync_free": lambda: sf.chain(
        sf.ssbfgs(memory_size=3), sf.armijo_sync_free()
    ),
    "sr1+trust_region": lambda: sf.chain(sf.sr1(), sf.trust_region()),
    "broyden+trust_region": lambda: sf.chain(sf.broyden(), sf.trust_region()),
    "nonlinear_cg+armijo_sync_free": lambda: sf.chain(sf.nonlinear_cg(), sf.armijo_sync_free()),
    "newton_krylov+trust_region": lambda: sf.chain(
        sf.newton_krylov(check_every=None), sf.trust_region()
    ),
    "newton_krylov+dogleg": lambda: sf.chain(
        sf.newton_krylov(check_every=None), sf.trust_region(solver="dogleg")
    ),
    "newton_krylov+levenberg": lambda: sf.chain(sf.newton_krylov(check_every=None), sf.levenberg()),
    "gauss_newton+armijo_sync_free": lambda: sf.chain(sf.gauss_newton(), sf.armijo_sync_free()),
    "gauss_newton+trust_region": lambda: sf.chain(sf.gauss_newton(), sf.trust_region()),
    "levenberg_marquardt": lambda: sf.levenberg_marquardt(),
    "levenberg_marquardt(cg)": lambda: sf.levenberg_marquardt(solver="cg"),
}


def run_updates(transform: sf.Transform, data, params: dict, step=None):
    """``N_STEPS`` updates from ``params`` (value and gradient evaluated eagerly between
    them, as a driver does); returns the updates of each step, stacked per leaf."""
    value_fn, residual_fn = partial(loss, data), partial(residual, data)

    def one(grad, state, params, value):
        return transform.update(
            grad, state, params, value=value, grad=grad, value_fn=value_fn, residual_fn=residual_fn
        )

    step = one if step is None else step(one)
    state = transform.init(params)
    taken = []
    for _ in range(N_STEPS):
        value, grad = sf.value_and_grad(value_fn)(params)
        updates, state = step(grad, state, params, value)
        taken.append(updates)
        params = sf.apply_updates(params, updates)
    return {key: torch.stack([u[key] for u in taken]) for key in params}


def compile_available() -> str | None:
    """Why ``torch.compile`` cannot run here (None: it can)."""
    if not hasattr(torch, "compile"):
        return "torch.compile is not available"
    if not torch._dynamo.is_dynamo_supported():
        return "dynamo is not supported on this platform"
    return None


def compiled(backend: str):
    def wrap(fn):
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend=backend)

    return wrap


def assert_close(got: dict, want: dict, tol: float) -> None:
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol)


#: Compiled in every run (about 50 s each on one core); SOO_FUNC_FULL_COMPILE=1 compiles
#: every case and the inductor one too (about 15 minutes).
REPRESENTATIVE = ("lbfgs+armijo_sync_free", "newton_krylov+trust_region", "levenberg_marquardt")
FULL_COMPILE = os.environ.get("SOO_FUNC_FULL_COMPILE") == "1"
COMPILE_CASES = [(name, "aot_eager") for name in CASES if FULL_COMPILE or name in REPRESENTATIVE]
COMPILE_CASES += [("lbfgs+armijo_sync_free", "inductor")] if FULL_COMPILE else []


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_compiled_updates_match_eager(name, backend):
    reason = compile_available()
    if reason is not None:
        pytest.skip(reason)
    data, params = make_data()
    eager = run_updates(CASES[name](), data, params)
    traced = run_updates(CASES[name](), data, params, step=compiled(backend))
    torch._dynamo.reset()
    assert all(torch.isfinite(u).all() for u in eager.values())
    assert_close(traced, eager, 1e-11)


@pytest.mark.parametrize("name", list(CASES))
def test_vmapped_updates_match_per_problem_updates(name):
    batch = 3
    datas, params = make_data(batch, seed=1)

    def one(a, y, w, b):
        return run_updates(CASES[name](), (a, y), {"w": w, "b": b})

    batched = torch.func.vmap(one)(*datas, params["w"], params["b"])
    for i in range(batch):
        alone = one(datas[0][i], datas[1][i], params["w"][i], params["b"][i])
        assert_close({k: v[i] for k, v in batched.items()}, alone, 1e-10)


def _armijo_counts(direction: sf.Transform, value_fn, params, backend: str | None):
    """``(step, num_search_evals, num_search_grads)`` of one armijo_sync_free update after
    ``direction`` (compiled with ``backend``; eager when None)."""
    transform = sf.chain(direction, sf.armijo_sync_free())

    def step(grad, state, params, value):
        return transform.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)

    if backend is not None:
        step = compiled(backend)(step)
    value, grad = sf.value_and_grad(value_fn)(params)
    updates, state = step(grad, transform.init(params), params, value)
    search = state.states[-1]
    return updates, int(search.num_search_evals), int(search.num_search_grads)


def rosenbrock(params: dict) -> torch.Tensor:
    x = params["x"]
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@pytest.mark.slow
def test_compiled_sync_free_armijo_evaluates_only_the_trials_it_needs():
    reason = compile_available()
    if reason is not None:
        pytest.skip(reason)
    data, params = make_data()
    quadratic = partial(loss, (data[0], data[1]))
    # A Newton step on a near-quadratic: the first trial is accepted, one evaluation.
    newton = sf.newton_krylov(check_every=None)
    eager, eager_evals, _ = _armijo_counts(newton, quadratic, params, None)
    assert eager_evals == 9  # the all-trials path: max_steps values and one value_and_grad
    traced, evals, grads = _armijo_counts(newton, quadratic, params, "aot_eager")
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=0)
    assert (evals, grads) == (1, 1)
    # Steepest descent on Rosenbrock: backtracking, each trial once, then value_and_grad.
    x0 = {"x": torch.tensor([-1.2, 1.0, -0.5], dtype=D)}
    eager, _, _ = _armijo_counts(sf.scale(-1.0), rosenbrock, x0, None)
    traced, evals, grads = _armijo_counts(sf.scale(-1.0), rosenbrock, x0, "aot_eager")
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=0)
    assert 2 < evals < 9 and grads == 2
    torch._dynamo.reset()


def test_eager_code_takes_no_compiled_branches():
    assert not compiles_control_flow()


def test_transform_made_inside_the_compiled_region_traces_whole():
    """A chain built inside the compiled function: ``update_and_publish`` reads whether each
    member's ``update`` takes ``**extra`` from its code object (``inspect.signature`` raises
    inside dynamo), for our members and for an optax-style one without extras."""
    reason = compile_available()
    if reason:
        pytest.skip(reason)

    def optax_style(factor: float) -> sf.Transform:
        def update(updates, state, params=None):  # no **extra: called without extras
            return {k: factor * u for k, u in updates.items()}, state

        return sf.Transform(lambda params: sf.EmptyState(), update)

    def step(grad: dict, params: dict, value: torch.Tensor) -> dict:
        opt = sf.chain(sf.scale(0.5), optax_style(-3.0))
        updates, _ = opt.update(grad, opt.init(params), params, value=value)
        return updates

    (data, params) = make_data()
    value, grad = sf.value_and_grad(partial(loss, data))(params)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(grad, params, value)
    assert_close(got, {k: -1.5 * g for k, g in grad.items()}, 1e-15)


def _vmapped_steps(transform: sf.Transform, datas, params: dict, wrap=None) -> dict:
    """``N_STEPS`` vmapped updates of a batch of problems, each step one ``vmap`` of
    (value and gradient, update) over the batch, optionally wrapped (compiled)."""

    def one(a, y, state, params):
        value_fn, residual_fn = partial(loss, (a, y)), partial(residual, (a, y))
        grad, value = torch.func.grad_and_value(value_fn)(params)
        return transform.update(
            grad, state, params, value=value, grad=grad, value_fn=value_fn, residual_fn=residual_fn
        )

    step = torch.func.vmap(one)
    step = step if wrap is None else wrap(step)
    state, taken = torch.func.vmap(transform.init)(params), []
    for _ in range(N_STEPS):
        updates, state = step(*datas, state, params)
        taken.append(updates)
        params = sf.apply_updates(params, updates)
    return {key: torch.stack([u[key] for u in taken]) for key in params}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levenberg_marquardt", "levenberg_marquardt(cg)"])
def test_compiled_vmapped_updates_match_eager(name):
    """``torch.compile(vmap(step))``: the dense Jacobian's ``vmap`` of ``jvp`` does not trace
    there (pytorch/pytorch#151196) and is unrolled, and no traced function is memoized."""
    reason = compile_available()
    if reason is not None:
        pytest.skip(reason)
    datas, params = make_data(3, seed=2)
    eager = _vmapped_steps(CASES[name](), datas, params)
    traced = _vmapped_steps(CASES[name](), datas, params, wrap=compiled("aot_eager"))
    torch._dynamo.reset()
    assert all(torch.isfinite(u).all() for u in eager.values())
    assert_close(traced, eager, 1e-11)


@pytest.mark.slow
def test_compiled_levenberg_marquardt_takes_a_new_residual_function_without_recompiling():
    """A new ``residual_fn`` (another batch of data) at each call: the compiled update is
    traced once the cache is filled, and never takes the Jacobian cached for another
    function (the eager results, where the cache is keyed by function)."""
    reason = compile_available()
    if reason is not None:
        pytest.skip(reason)
    (datas, params), transform = make_data(4, seed=3), CASES["levenberg_marquardt"]()

    def run(step, warm: int) -> list[dict]:
        state, p, taken = transform.init(params_0), params_0, []
        for k in range(4):
            data = (datas[0][k], datas[1][k])
            value, grad = sf.value_and_grad(partial(loss, data))(p)
            stance = "fail_on_recompile" if k >= warm else "default"
            with torch.compiler.set_stance(stance):
                updates, state = step(
                    grad,
                    state,
                    p,
                    value=value,
                    value_fn=partial(loss, data),
                    residual_fn=partial(residual, data),
                )
            taken.append(updates)
            p = sf.apply_updates(p, updates)
        return taken

    params_0 = {key: leaf[0] for key, leaf in params.items()}
    eager = run(transform.update, warm=4)
    torch._dynamo.reset()
    traced = run(torch.compile(transform.update, fullgraph=True, backend="aot_eager"), warm=2)
    torch._dynamo.reset()
    for got, want in zip(traced, eager, strict=True):
        assert_close(got, want, 1e-11)


def test_compile_inside_vmap_runs_eagerly_with_a_warning():
    """``torch.compile`` cannot trace from inside ``vmap``: ``compile=True`` there says so
    and runs the eager steps (the vmapped result), instead of a graph broken into pieces."""
    datas, params = make_data(3, seed=4)

    def solve(a, y, w, b, compile: bool) -> dict:
        result = sf.least_squares(
            partial(residual, (a, y)),
            {"w": w, "b": b},
            sf.levenberg_marquardt(),
            max_steps=5,
            check_every=None,
            compile=compile,
        )
        return result.params

    want = torch.func.vmap(partial(solve, compile=False))(*datas, params["w"], params["b"])
    with pytest.warns(UserWarning, match=r"inside torch.func.vmap .* run eagerly"):
        got = torch.func.vmap(partial(solve, compile=True))(*datas, params["w"], params["b"])
    assert_close(got, want, 0.0)


@pytest.mark.parametrize(
    "name,make",
    [
        ("wolfe", lambda: sf.chain(sf.lbfgs(), sf.wolfe())),
        ("armijo", lambda: sf.chain(sf.bfgs(), sf.armijo())),
    ],
)
def test_a_host_deciding_search_names_itself_under_fullgraph_compile(name, make):
    """``fullgraph=True`` on a search that decides on the host: the error names the search
    and what traces whole (was dynamo's "function marked as skipped" deep in a check)."""
    reason = compile_available()
    if reason is not None:
        pytest.skip(reason)
    data, params = make_data()
    match = rf"{name} reads each trial's value on the host.*armijo_sync_free"
    with pytest.raises(torch._dynamo.exc.Unsupported, match=match):
        run_updates(make(), data, params, step=compiled("eager"))
    torch._dynamo.reset()
    without_fullgraph = torch.compile(backend="eager")
    eager = run_updates(make(), data, params)
    assert_close(run_updates(make(), data, params, step=without_fullgraph), eager, 0.0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_with_dynamic_shapes_matches_eager():
    """``torch.compile(dynamic=True)`` traces the float options of ``armijo_sync_free`` as
    symbolic floats, which ``torch.cond`` refused as branch operands ("can only be of
    Tensor, int, SymInt")."""
    reason = compile_available()
    if reason is not None:
        pytest.skip(reason)

    def dynamic(fn):
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)

    data, params = make_data()
    name = "lbfgs+armijo_sync_free"
    eager = run_updates(CASES[name](), data, params)
    traced = run_updates(CASES[name](), data, params, step=dynamic)
    torch._dynamo.reset()
    assert_close(traced, eager, 1e-11)
