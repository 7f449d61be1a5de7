"""Compiled, sync-free L-BFGS against ``torch.optim.LBFGS``, measured side by side.

Ours: ``sf.minimize(value_fn, params, chain(lbfgs(10), armijo_sync_free(max_steps=TRIALS)),
max_steps=S, check_every=None, compile=True, gtol=0)``: the public sync-free driver, its
step compiled once (``fullgraph=True``; ``ours_mode`` says whether a later call recompiled).
Torch: ``torch.optim.LBFGS(history_size=10, line_search_fn="strong_wolfe")`` for ``STEPS``
iterations (:func:`benchmarks.bench_quasi_newton.run_torch`). Problems (from
``bench_quasi_newton``): the cheap 64-tensor objective (2.1M parameters; 131k quick) and
logistic regression 100k x 400 (10k x 100 quick), in float32 and float64, with the
objective as written (``objective=eager``) and wrapped in ``torch.compile`` for both
(``objective=compiled``; inside our compiled step it is traced either way).

Same budget: torch's ``E`` closure calls (each one value and gradient) include the one at
the start, and so do our counts (the driver evaluates the start, then each step's accepted
trial), so ours runs ``E - 1`` steps (:func:`our_steps`): ``E`` values and gradients when
every first trial is accepted. Under ``compile=True`` the search's trials are
``torch.cond`` branches, so an accepted first trial costs one value and gradient, a
rejected one a value per further trial and one more gradient; the first step runs eager
(all ``TRIALS`` trial values, then one value and gradient). ``ours_values`` /
``ours_grads`` are the driver's counts (the trials it evaluated).
``ratio_cpu`` / ``ratio_wall`` = our time / torch's (goal <= 0.5 cheap, <= 0.9 logreg);
compile time is excluded from the ratios (a warm-up solve of 3 steps compiles first) and
reported apart (``ours_warm_up_cpu_s`` / ``ours_warm_up_wall_s``: the warm-up solve, compile
included; inductor's compile workers' CPU time is not in the CPU figure). Ours and torch run interleaved
``repeats`` times, medians reported.

Run: ``python -m benchmarks.run --suite lbfgs_vs_torch [--quick] [--device cuda]``
(``SOO_FUNC_BENCH_COMPILE_MODE=reduce-overhead`` for CUDA graphs: the objective's mode).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch

import soo_func as sf
from benchmarks.bench_quasi_newton import cheap_problem, logreg_problem, run_torch
from benchmarks.run import bench_device, main
from benchmarks.sync_free_loops import Clock, compile_mode, lbfgs_chain

STEPS = 50
TRIALS = 3  # armijo_sync_free trials per step (lbfgs's unit step is usually taken)

PROBLEMS = {"cheap": cheap_problem, "logreg": logreg_problem}


def run_ours(opt: sf.Transform, value_fn: Callable, params, steps: int, compile: bool) -> dict:
    """Our timed run: ``steps`` sync-free steps through :func:`soo_func.minimize`."""
    with Clock() as clock:
        result = sf.minimize(
            value_fn, params, opt, max_steps=steps, gtol=0.0, check_every=None, compile=compile
        )
        value = float(result.value)
    return {
        "seconds": clock.wall,
        "cpu_seconds": clock.cpu,
        "value": value,
        "values": result.num_value_evals,
        "grads": result.num_grad_evals,
    }


def our_steps(torch_evals: int) -> int:
    """Our step budget for torch's ``torch_evals`` closure calls: one fewer, since both
    counts include the evaluation at the start (module docstring)."""
    return max(torch_evals - 1, 1)


def _frames() -> int:
    """Dynamo's count of graphs compiled so far (a recompile adds one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def compare(
    problem: str,
    dtype: torch.dtype,
    objective: str,
    *,
    quick: bool,
    steps: int,
    repeats: int,
    compile_ours: bool = True,
) -> dict:
    """One row: ours against torch on one problem, dtype and objective mode."""
    value_fn, params = PROBLEMS[problem](quick, dtype=dtype, device=bench_device())
    torch._dynamo.reset()
    if objective == "compiled":
        value_fn = torch.compile(value_fn, mode=compile_mode())
    run_torch(value_fn, params, 2)  # warm-up (and the objective's compile)
    opt = lbfgs_chain(TRIALS)
    warm_up = run_ours(opt, value_fn, params, 3, compile_ours)  # compiles the step
    graphs = _frames()
    torch_runs, our_runs = [], []
    for _ in range(repeats):
        torch_runs.append(run_torch(value_fn, params, steps))
        budget = our_steps(torch_runs[-1]["evals"])
        our_runs.append(run_ours(opt, value_fn, params, budget, compile_ours))
    if not compile_ours:
        mode = "eager (not asked to compile)"
    else:
        recompiled = _frames() - graphs
        mode = "compiled" + (f" ({recompiled} graphs compiled after warm-up)" if recompiled else "")
    row = _row(problem, dtype, objective, mode, params, torch_runs, our_runs)
    row["ours_warm_up_cpu_s"] = round(warm_up["cpu_seconds"], 2)  # 3 steps and the compile
    row["ours_warm_up_wall_s"] = round(warm_up["seconds"], 2)
    return row


def _row(problem, dtype, objective, mode, params, torch_runs, our_runs) -> dict:
    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    evals = torch_runs[-1]["evals"]
    return {
        "problem": problem,
        "dtype": str(dtype).removeprefix("torch."),
        "objective": objective,
        "device": bench_device(),
        "n": sum(t.numel() for t in params.values()),
        "ours_mode": mode,
        "torch_evals": evals,
        "ours_steps": our_steps(evals),
        "ours_values": our_runs[-1]["values"],
        "ours_grads": our_runs[-1]["grads"],
        "torch_cpu_s": round(median(torch_runs, "cpu_seconds"), 4),
        "ours_cpu_s": round(median(our_runs, "cpu_seconds"), 4),
        "ratio_cpu": round(median(our_runs, "cpu_seconds") / median(torch_runs, "cpu_seconds"), 3),
        "ratio_wall": round(median(our_runs, "seconds") / median(torch_runs, "seconds"), 3),
        "torch_loss": torch_runs[-1]["value"],
        "ours_loss": our_runs[-1]["value"],
        "repeats": len(torch_runs),
    }


def lbfgs_vs_torch(quick: bool, compile_ours: bool = True) -> list[dict]:
    """Both problems, float32 and float64, objective eager and compiled: 8 rows."""
    steps = 10 if quick else STEPS
    repeats = 1 if quick else 3
    rows = []
    for problem in PROBLEMS:
        for dtype in (torch.float32, torch.float64):
            for objective in ("eager", "compiled"):
                rows.append(
                    compare(
                        problem,
                        dtype,
                        objective,
                        quick=quick,
                        steps=steps,
                        repeats=repeats,
                        compile_ours=compile_ours,
                    )
                )
    torch._dynamo.reset()
    return rows


SUITES = {"lbfgs_vs_torch": lbfgs_vs_torch}


if __name__ == "__main__":  # the runner parses --quick and --device
    sys.exit(main(["--suite", "lbfgs_vs_torch", *sys.argv[1:]]))
