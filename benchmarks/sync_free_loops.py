"""Shared pieces of the compiled and batched benchmarks: the clock, the compile mode, the
chains, and the batched solves as calls of the public sync-free driver.

The solves go through :func:`soo_func.batched_least_squares` and
:func:`soo_func.batched_minimize` (the sync-free driver, ``check_every=None``, vmapped);
:func:`make_step` is one bare step, for ``benchmarks/gpu_check.py``'s host-sync check.
A step is ``x+ = x + u`` where ``(u, state) = opt.update(g, state, x, value=f, grad=g,
value_fn=f)``; the search publishes ``next_value``/``next_grad`` at ``x+`` (N&W
Algorithm 7.5 for L-BFGS with a backtracking search, Algorithm 3.1), which the next
step reuses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

import soo_func as sf

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


def make_step(opt: sf.Transform, value_fn: Callable) -> Step:
    """One optimizer step ``(x, state, f, g) -> (x+, state+, f(x+), g(x+))``, no host read."""

    def step(x: PyTree, state: Any, value: torch.Tensor, grad: PyTree):
        updates, state, published = sf.update_and_publish(
            opt, grad, state, x, value=value, grad=grad, value_fn=value_fn
        )
        return sf.apply_updates(x, updates), state, published["next_value"], published["next_grad"]

    return step


def lbfgs_chain(trials: int) -> sf.Transform:
    """``chain(lbfgs(10), armijo_sync_free(max_steps=trials))``."""
    return sf.chain(sf.lbfgs(10), sf.armijo_sync_free(max_steps=trials))


def lm_batched(
    residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0s: torch.Tensor,
    datas: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """``levenberg_marquardt`` on each ``(x0, data)`` pair: :func:`soo_func.batched_least_squares`
    (``steps`` steps at most, per-problem damping, acceptance and convergence)."""
    return sf.batched_least_squares(residual, x0s, args=(datas,), max_steps=steps).params


def lbfgs_batched(
    value_fn: Callable[[torch.Tensor], torch.Tensor], x0s: torch.Tensor, steps: int, trials: int
) -> torch.Tensor:
    """``chain(lbfgs(), armijo_sync_free())`` from each start: :func:`soo_func.batched_minimize`."""
    return sf.batched_minimize(value_fn, x0s, lbfgs_chain(trials), max_steps=steps).params
