"""L-BFGS-B against scipy's ``L-BFGS-B`` on bound-constrained problems.

Suites (``python -m benchmarks.run --suite NAME [--quick]``):

``bounds_mgh``
    The Moré-Garbow-Hillstrom problems (:data:`benchmarks.problems.UNCONSTRAINED`) with
    bounds that cut the unconstrained minimizer: with ``x*`` scipy's unconstrained
    L-BFGS-B solution from the standard start ``x0``, every entry that moves gets a bound
    half way from ``x0`` to ``x*`` on ``x*``'s side (the other side unbounded), so ``x0``
    is feasible and ``x*`` is not. ``sf.lbfgs_b`` and scipy both stop at a projected
    gradient ``||P(x - g) - x||_inf <= 1e-5``; per problem: solved, value, evaluations;
    every soo_func iterate is checked to lie in the box.
``bounds_mgh_summary``
    Solved counts, and over the problems both solve the median evaluations, their ratio of
    medians, the median per-problem ratio and how often both end at the same value.
"""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED, Problem, scipy_funcs

PGTOL = 1e-5
MAX_STEPS = 2000
QUICK_PROBLEMS = ("rosenbrock", "beale", "helical_valley", "wood", "powell_singular")


@functools.cache
def cut_bounds(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lower, upper)`` cutting the unconstrained minimizer of problem ``name``."""
    problem = UNCONSTRAINED[name]
    funcs = scipy_funcs(problem)
    x0 = problem.x0.numpy()
    free = scipy.optimize.minimize(
        funcs.fun,
        x0,
        jac=funcs.jac,
        method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15},
    )
    middle = 0.5 * (x0 + free.x)
    moves = np.abs(free.x - x0) > 1e-8 * (1 + np.abs(x0))
    lower = np.where(moves & (free.x < x0), middle, -np.inf)
    upper = np.where(moves & (free.x > x0), middle, np.inf)
    return torch.tensor(lower, dtype=problem.x0.dtype), torch.tensor(upper, dtype=problem.x0.dtype)


def projected_grad_inf(x: np.ndarray, g: np.ndarray, lower, upper) -> float:
    return float(np.max(np.abs(np.clip(x - g, lower, upper) - x))) if x.size else 0.0


def run_ours(problem: Problem, lower: torch.Tensor, upper: torch.Tensor) -> dict:
    def inside(row, params):
        if not bool(((params >= lower) & (params <= upper)).all()):
            raise AssertionError(f"{problem.name}: step {row['step']} left the box")

    result = sf.minimize(problem.fn, problem.x0.clone(), sf.lbfgs_b(lower, upper),
                         gtol=PGTOL, max_steps=MAX_STEPS, callback=inside)  # fmt: skip
    return {"solved": bool(result.converged), "value": float(result.value),
            "value_evals": result.num_value_evals, "steps": result.num_steps}  # fmt: skip


def run_scipy(problem: Problem, lower: torch.Tensor, upper: torch.Tensor) -> dict:
    funcs = scipy_funcs(problem)
    lo, hi = lower.numpy(), upper.numpy()
    bounds = list(
        zip(np.where(np.isinf(lo), None, lo), np.where(np.isinf(hi), None, hi), strict=True)
    )
    result = scipy.optimize.minimize(funcs.fun, problem.x0.numpy(), jac=funcs.jac,
                                     method="L-BFGS-B", bounds=bounds,
                                     options={"maxiter": MAX_STEPS, "gtol": PGTOL, "ftol": 0.0})  # fmt: skip
    measure = projected_grad_inf(result.x, funcs.jac(result.x), lo, hi)
    return {"solved": measure <= PGTOL, "value": float(result.fun), "value_evals": int(result.nfev),
            "steps": int(result.nit)}  # fmt: skip


def rows(quick: bool) -> list[dict]:
    names = QUICK_PROBLEMS if quick else tuple(UNCONSTRAINED)
    out = []
    for name in names:
        problem = UNCONSTRAINED[name]
        lower, upper = cut_bounds(name)
        out.append({"problem": name, "method": "sf.lbfgs_b", **run_ours(problem, lower, upper)})
        out.append(
            {"problem": name, "method": "scipy L-BFGS-B", **run_scipy(problem, lower, upper)}
        )
    return out


def summarize(table: list[dict]) -> list[dict]:
    by = {(r["problem"], r["method"]): r for r in table}
    problems = list(dict.fromkeys(r["problem"] for r in table))
    ours = [by[(p, "sf.lbfgs_b")] for p in problems]
    theirs = [by[(p, "scipy L-BFGS-B")] for p in problems]
    both = [(a, b) for a, b in zip(ours, theirs, strict=True) if a["solved"] and b["solved"]]
    mine = [a["value_evals"] for a, _ in both]
    peer = [b["value_evals"] for _, b in both]
    same = sum(math.isclose(a["value"], b["value"], rel_tol=1e-6, abs_tol=1e-9) for a, b in both)
    nan = float("nan")
    return [{
        "method": "sf.lbfgs_b", "peer": "scipy L-BFGS-B", "problems": len(problems),
        "solved": sum(a["solved"] for a in ours), "peer_solved": sum(b["solved"] for b in theirs),
        "both_solved": len(both), "same_value": same,
        "lower_value": sum(a["value"] < b["value"] - 1e-6 * max(1, abs(b["value"])) for a, b in both),
        "median_evals": statistics.median(mine) if mine else nan,
        "peer_median_evals": statistics.median(peer) if peer else nan,
        "evals_ratio_of_medians": statistics.median(mine) / statistics.median(peer) if mine else nan,
        "median_evals_ratio": statistics.median(m / max(t, 1) for m, t in zip(mine, peer, strict=True)) if mine else nan,
    }]  # fmt: skip


def bounds_mgh(quick: bool) -> list[dict]:
    return rows(quick)


def bounds_mgh_summary(quick: bool) -> list[dict]:
    return summarize(rows(quick))


SUITES = {"bounds_mgh": bounds_mgh, "bounds_mgh_summary": bounds_mgh_summary}
