"""Hyper-gradients through an L-BFGS solve: ``adjoint="implicit"`` against ``"unrolled"``.

Issue 18's cost benchmark. Inner problem: L2-regularized logistic regression,
``f(x; w) = mean BCE(X x, y) + 0.5 sum_j w_j x_j^2`` with ``X`` 10,000 x 100 (float64),
its columns scaled from 1 down to 1e-3 so that L-BFGS (memory 10, strong Wolfe) needs
hundreds of steps; the hyper-parameters are the 100 per-feature L2 weights ``w``. Outer
loss: the mean BCE on a validation set of 2,000 rows at ``x*(w)``; the hyper-gradient is
``dL/dw``.

For each step budget (100 and 1,000; ``gtol=1e-8`` on ``|grad|_inf``) and each adjoint
(``implicit``: the default solver of the adjoint system, a Cholesky factorization of the
Hessian formed from 100 batched products; ``implicit_cg``: CG on Hessian-vector products,
side by side; ``unrolled``):

* time: the solve (forward) and the backward, wall clock and CPU time of the process
  (``_cpu_s``), one run each (``OMP_NUM_THREADS`` as set by the caller). Implicit's
  forward is the plain (detached) solve and its attachment; unrolled's records the graph
  of every step. The ratio rows give ``total_s`` (forward + backward, the issue's goal is
  at most 0.2) and ``gradient_cost``, what the gradient adds to the plain solve:
  implicit's backward over unrolled's forward + backward minus implicit's forward (the
  solve cannot be cheaper than the plain solve, so ``total_s`` is bounded below by the
  plain solve's share of unrolled's total);
* peak memory: the highest total of CPU allocations made during the forward and backward,
  from ``torch.profiler``'s memory events (``profile_memory=True``: every allocation and
  free of the CPU allocator, summed in time order), in a second run under the profiler;
  and the bytes the forward's autograd graph saves for the backward (distinct storages
  packed through ``torch.autograd.graph.saved_tensors_hooks``, the data excluded);
* error: ``|g - g_ref| / |g_ref|`` against the reference ``g_ref = -x* . (H^{-1} grad L)``
  (the implicit function theorem with the dense Hessian ``H`` from ``torch.func.hessian``
  at a Newton-polished solution), itself checked against central finite differences of
  re-solved problems along a random direction (``reference_fd_disagreement``).

A run of 100 steps has not converged: the driver's implicit backward refuses such a point
(by design), so both budgets attach the solution through :func:`soo_func.implicit.minimizer`
with ``tol`` at twice the measured ``|grad|_inf``, which is what the driver does for a
converged run; the 100-step errors show why the driver refuses.
"""

from __future__ import annotations

import gc
import math
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

import soo_func as sf

D = torch.float64
GOAL_TIME_RATIO = 0.2  # implicit (forward + backward) over unrolled, at the full step budget
ADJOINTS = ("implicit", "implicit_cg", "unrolled")
MIB = 2.0**20
CG_MAX_ITERS = 2000


class Problem(NamedTuple):
    features: torch.Tensor
    labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    weights: torch.Tensor  # the per-feature L2 weights: the hyper-parameters


def make_problem(quick: bool, seed: int = 0) -> Problem:
    """Logistic regression with columns scaled 1 .. 10^-decades (an ill-conditioned Hessian)."""
    m, n, decades = (2_000, 30, 2.0) if quick else (10_000, 100, 3.0)
    gen = torch.Generator().manual_seed(seed)
    scales = 10 ** (-decades * torch.arange(n, dtype=D) / (n - 1))
    truth = torch.randn(n, generator=gen, dtype=D) / scales.sqrt()

    def sample(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(rows, n, generator=gen, dtype=D) * scales
        p = torch.sigmoid(3 * (x @ truth) / math.sqrt(n))
        return x, (torch.rand(rows, generator=gen, dtype=D) < p).to(D)

    features, labels = sample(m)
    val_features, val_labels = sample(m // 5)
    return Problem(features, labels, val_features, val_labels, torch.full((n,), 1e-5, dtype=D))


def inner(x: torch.Tensor, features, labels, weights) -> torch.Tensor:
    logits = features @ x
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    return loss + 0.5 * (weights * x * x).sum()


def outer(x: torch.Tensor, problem: Problem) -> torch.Tensor:
    logits = problem.val_features @ x
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, problem.val_labels)


def newton_solve(problem: Problem, weights: torch.Tensor, x: torch.Tensor, steps: int = 30):
    """Dense Newton steps (``torch.func.hessian``) to machine precision; ``(x*, H)``."""

    def fn(z):
        return inner(z, problem.features, problem.labels, weights)

    for _ in range(steps):
        g = torch.func.grad(fn)(x)
        hess = torch.func.hessian(fn)(x)
        x = x - torch.linalg.solve(hess, g)
        if float(g.abs().max()) < 1e-15:
            break
    return x, torch.func.hessian(fn)(x)


def reference(problem: Problem, start: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``g_ref = -x* . H^{-1} grad L(x*)`` (``d grad_x f / d w_j = x_j e_j``), and its
    relative disagreement with central differences along a random direction."""
    x_star, hess = newton_solve(problem, problem.weights, start)
    outer_grad = torch.func.grad(lambda z: outer(z, problem))(x_star)
    g_ref = -x_star * torch.linalg.solve(hess, outer_grad)
    gen = torch.Generator().manual_seed(1)
    direction = problem.weights * torch.randn(len(problem.weights), generator=gen, dtype=D)
    h = 1e-4
    values = [
        outer(newton_solve(problem, problem.weights + s * h * direction, x_star)[0], problem)
        for s in (1, -1)
    ]
    fd = float(values[0] - values[1]) / (2 * h)
    exact = float(g_ref @ direction)
    return g_ref, abs(fd - exact) / abs(exact)


def solve(problem: Problem, adjoint: str, max_steps: int) -> tuple[Any, torch.Tensor, Any]:
    """The solution from zero, attached to autograd by ``adjoint``; ``(x, weights, result)``."""
    weights = problem.weights.clone().requires_grad_(True)
    args = (problem.features, problem.labels, weights)
    optimizer = sf.chain(sf.lbfgs(), sf.wolfe())
    start = torch.zeros(problem.features.shape[1], dtype=D)
    if adjoint == "unrolled":
        result = sf.minimize(
            inner, start, optimizer, args=args, adjoint="unrolled", max_steps=max_steps, gtol=1e-8
        )
        return result.params, weights, result
    result = sf.minimize(inner, start, optimizer, args=args, max_steps=max_steps, gtol=1e-8)
    tol = 2 * float(sf.tree.norm(result.grad, math.inf)) + 1e-300  # as the driver's
    # an ill-conditioned Hessian: CG needs more than the default 2 n iterations
    solver = "cg" if adjoint == "implicit_cg" else "auto"  # auto: dense here (n = 100)
    x = sf.implicit.minimizer(
        inner, result.params, args, solver=solver, tol=tol, max_iters=CG_MAX_ITERS
    )
    return x, weights, result


def hypergradient(problem: Problem, adjoint: str, max_steps: int) -> tuple[Any, dict]:
    """``dL/dw`` through a solve from zero; the timings and the run's facts."""
    clocks = [(time.perf_counter(), time.process_time())]
    x, weights, result = solve(problem, adjoint, max_steps)
    clocks.append((time.perf_counter(), time.process_time()))
    (grad,) = torch.autograd.grad(outer(x, problem), weights)
    clocks.append((time.perf_counter(), time.process_time()))
    facts: dict[str, Any] = {"num_steps": result.num_steps, "converged": result.converged}
    for clock, suffix in ((0, "_s"), (1, "_cpu_s")):
        forward, backward = (clocks[i + 1][clock] - clocks[i][clock] for i in (0, 1))
        facts |= {f"forward{suffix}": forward, f"backward{suffix}": backward}
        facts[f"total{suffix}"] = forward + backward
    return grad, facts


class _Saved:
    """What the pack hook stores for one saved tensor: a detached alias (no reference
    cycle through the tensor's ``grad_fn``; autograd restores it on unpack)."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def memory(problem: Problem, adjoint: str, max_steps: int) -> dict[str, float]:
    """Peak CPU allocation (profiler) over forward + backward, and the bytes of the
    tensors that the forward's graph holds for the backward when the forward ends
    (distinct storages of the saved tensors still alive, the problem's data excluded; the
    hooks cover the forward only, as ``torch.func`` refuses them)."""
    data = {t.untyped_storage().data_ptr() for t in problem}
    alive: weakref.WeakSet[_Saved] = weakref.WeakSet()

    def pack(t: torch.Tensor) -> _Saved:
        saved = _Saved(t.detach())
        alive.add(saved)
        return saved

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with hooks:
            x, weights, _ = solve(problem, adjoint, max_steps)
        gc.collect()
        storages = {s.tensor.untyped_storage() for s in alive}
        graph = sum(st.nbytes() for st in storages if st.data_ptr() not in data)
        del storages
        torch.autograd.grad(outer(x, problem), weights)
    return {"peak_MiB": peak_bytes(prof) / MIB, "graph_MiB": graph / MIB}


def peak_bytes(prof: profile) -> float:
    """The highest running total of the profiler's CPU ``[memory]`` events (allocations
    positive, frees negative) in time order, relative to the start."""
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    total = best = 0
    for _, nbytes in sorted(events):
        total += nbytes
        best = max(best, total)
    return float(best)


def _time_ratios(imp: dict, unr: dict, suffix: str) -> dict[str, float]:
    """Total, backward-only and gradient-only (over the plain solve) time ratios."""
    total, forward, backward = (f"{what}{suffix}" for what in ("total", "forward", "backward"))
    return {
        total: imp[total] / unr[total],
        backward: imp[backward] / unr[backward],
        f"gradient_cost{suffix}": imp[backward] / (unr[total] - imp[forward]),
    }


def _ratios(rows: list[dict], budgets: tuple[int, int]) -> list[dict]:
    by = {(r["max_steps"], r["adjoint"]): r for r in rows}
    short, full = budgets
    unr = by[(full, "unrolled")]
    out = []
    for adjoint in ("implicit", "implicit_cg"):
        imp = by[(full, adjoint)]
        out.append(
            {
                "max_steps": full,
                "adjoint": f"{adjoint} / unrolled",
                **_time_ratios(imp, unr, "_s"),
                **_time_ratios(imp, unr, "_cpu_s"),
                "peak_MiB": imp["peak_MiB"] / unr["peak_MiB"],
                "graph_MiB": imp["graph_MiB"] / unr["graph_MiB"],
                "time_goal_met": imp["total_s"] / unr["total_s"] <= GOAL_TIME_RATIO,
            }
        )
    for adjoint in ADJOINTS:
        out.append(
            {
                "max_steps": full,
                "adjoint": f"{adjoint} {full} / {short} steps",
                "peak_MiB": by[(full, adjoint)]["peak_MiB"] / by[(short, adjoint)]["peak_MiB"],
                "graph_MiB": by[(full, adjoint)]["graph_MiB"]
                / max(by[(short, adjoint)]["graph_MiB"], 1e-30),
            }
        )
    return out


def run_implicit(quick: bool) -> list[dict]:
    problem = make_problem(quick)
    budgets = (20, 200) if quick else (100, 1000)
    start = torch.zeros(problem.features.shape[1], dtype=D)
    g_ref, fd_disagreement = reference(problem, start)
    rows = []
    for max_steps in budgets:
        for adjoint in ADJOINTS:
            grad, facts = hypergradient(problem, adjoint, max_steps)
            error = float((grad - g_ref).norm() / g_ref.norm())
            rows.append(
                {"max_steps": max_steps, "adjoint": adjoint, **facts,
                 **memory(problem, adjoint, max_steps), "rel_error": error,
                 "reference_fd_disagreement": fd_disagreement}
            )  # fmt: skip
    return rows + _ratios(rows, budgets)


SUITES: dict[str, Callable[[bool], list[dict]]] = {"implicit": run_implicit}
