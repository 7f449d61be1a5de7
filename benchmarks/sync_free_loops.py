"""The soo_func side of the compiled and batched benchmarks, isolated in small functions.

Each function runs a fixed number of ``update_and_publish`` steps with the optimizer state,
the value and the gradient threaded through, and reads nothing on the host: the pattern
of the sync-free driver. Once ``sf.minimize(..., check_every=None, compile=True)`` and
``sf.least_squares(..., check_every=None)`` are merged, each body below becomes one driver
call (marked ``DRIVER:``); the suites call only these functions, so nothing else changes.

A step is ``x+ = x + u`` where ``(u, state) = opt.update(g, state, x, value=f, grad=g,
value_fn=f, [residual_fn=r])``; the search publishes ``next_value``/``next_grad`` at
``x+`` (N&W Algorithm 7.5 for L-BFGS with a backtracking search, Algorithm 3.1; Moré 1978
for Levenberg-Marquardt), which the next step reuses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.func import vmap

import soo_func as sf
from soo_func.searches.jacobian_cache import empty_jacobian_cache

PyTree = Any
Step = Callable[[PyTree, Any, torch.Tensor, PyTree], tuple[PyTree, Any, torch.Tensor, PyTree]]

COMPILE_MODE_VARIABLE = "SOO_FUNC_BENCH_COMPILE_MODE"


def compile_mode() -> str | None:
    """The ``torch.compile`` mode the suites use (``SOO_FUNC_BENCH_COMPILE_MODE``, e.g.
    ``reduce-overhead`` for CUDA graphs; ``None``: the default mode)."""
    return os.environ.get(COMPILE_MODE_VARIABLE) or None


def synchronize() -> None:
    """Wait for the CUDA device, when one is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Clock:
    """Wall and CPU (process) time of a ``with`` block; waits for the device at both ends."""

    def __enter__(self) -> Clock:
        synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize()
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def make_step(opt: sf.Transform, value_fn: Callable, residual_fn: Callable | None = None) -> Step:
    """One optimizer step ``(x, state, f, g) -> (x+, state+, f(x+), g(x+))``."""
    extra = {} if residual_fn is None else {"residual_fn": residual_fn}

    def step(x: PyTree, state: Any, value: torch.Tensor, grad: PyTree):
        updates, state, published = sf.update_and_publish(
            opt, grad, state, x, value=value, grad=grad, value_fn=value_fn, **extra
        )
        return sf.apply_updates(x, updates), state, published["next_value"], published["next_grad"]

    return step


def run_steps(step: Step, x: PyTree, state: Any, value_fn: Callable, steps: int):
    """``steps`` steps from ``x``; returns ``(x, state, value, grad)``."""
    value, grad = sf.value_and_grad(value_fn)(x)
    for _ in range(steps):
        x, state, value, grad = step(x, state, value, grad)
    return x, state, value, grad


class CompiledStep(NamedTuple):
    """A step and how it runs: ``"compiled fullgraph"`` or ``"eager (compile failed: ...)"``."""

    step: Step
    mode: str


def compiled_step(opt: sf.Transform, value_fn: Callable, params: PyTree) -> CompiledStep:
    """``torch.compile(step, fullgraph=True)`` of :func:`make_step`, warmed up by two steps
    from ``params``; the eager step when that fails (a compile with graph breaks is not
    tried: on the 64-tensor L-BFGS chain it compiled for minutes without finishing).
    DRIVER: ``sf.minimize(..., compile=True)`` compiles the step once itself."""
    eager = make_step(opt, value_fn)
    torch._dynamo.reset()
    step = torch.compile(eager, fullgraph=True, mode=compile_mode())
    try:
        run_steps(step, params, opt.init(params), value_fn, 2)
    except Exception as err:  # a compile failure is a result of the benchmark
        torch._dynamo.reset()
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
        return CompiledStep(eager, f"eager (compile failed: {reason})")
    return CompiledStep(step, "compiled fullgraph")


def lbfgs_chain(trials: int) -> sf.Transform:
    """``chain(lbfgs(10), armijo_sync_free(max_steps=trials))``."""
    return sf.chain(sf.lbfgs(10), sf.armijo_sync_free(max_steps=trials))


def solve_lbfgs(step: Step, opt: sf.Transform, value_fn: Callable, params: PyTree, steps: int):
    """``steps`` L-BFGS steps; returns the final value (a 0-d tensor).
    DRIVER: ``sf.minimize(value_fn, params, opt, max_steps=steps, check_every=None,
    compile=True).value``."""
    _, _, value, _ = run_steps(step, params, opt.init(params), value_fn, steps)
    return value


def fresh_jacobian(state: Any, x: PyTree) -> Any:
    """The Levenberg-Marquardt state with its Jacobian cache emptied. Today the cache's
    lookup reads a tensor on the host (``bool(...)``), which ``vmap`` cannot batch; an
    empty cache skips the lookup (its shape differs), at ``n`` more Jacobian columns per
    step. Remove once the traceable transforms are merged."""
    return state._replace(jacobian_cache=empty_jacobian_cache(x))


def lm_batched(
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0s: torch.Tensor,
    datas: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """``levenberg_marquardt`` on each ``(x0, data)`` pair, vmapped: ``steps`` steps each,
    per-problem damping and acceptance. ``residual(p, data)`` is one problem's residuals.
    DRIVER: ``vmap(lambda x0, d: sf.least_squares(partial(residual, data=d), x0,
    sf.levenberg_marquardt(), max_steps=steps, check_every=None).params)(x0s, datas)``."""
    opt = sf.levenberg_marquardt()

    def solve(x0: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        def residual_fn(p: torch.Tensor) -> torch.Tensor:
            return residual(p, data)

        def value_fn(p: torch.Tensor) -> torch.Tensor:
            return 0.5 * (residual(p, data) ** 2).sum()

        step = make_step(opt, value_fn, residual_fn)
        x, state = x0, opt.init(x0)
        value, grad = sf.value_and_grad(value_fn)(x)
        for _ in range(steps):
            x, state, value, grad = step(x, fresh_jacobian(state, x), value, grad)
        return x

    return vmap(solve)(x0s, datas)


def lbfgs_batched(
    value_fn: Callable[[torch.Tensor], torch.Tensor], x0s: torch.Tensor, steps: int, trials: int
) -> torch.Tensor:
    """``chain(lbfgs(), armijo_sync_free())`` from each start, vmapped, ``steps`` steps.
    DRIVER: ``vmap(lambda x0: sf.minimize(value_fn, x0, opt, max_steps=steps,
    check_every=None).params)(x0s)``."""
    opt = lbfgs_chain(trials)
    step = make_step(opt, value_fn)

    def solve(x0: torch.Tensor) -> torch.Tensor:
        x, _, _, _ = run_steps(step, x0, opt.init(x0), value_fn, steps)
        return x

    return vmap(solve)(x0s)
