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
``bounds_least_squares``
    ``sf.trust_region_reflective`` against ``scipy.optimize.least_squares(method="trf")``,
    both with the exact Jacobian (torch ``jacfwd``), on: the NIST StRD fits
    (:mod:`benchmarks.nist`) from both certified starts with positivity bounds
    (``nist_positive``, inactive at the certified optimum) and with an upper bound
    ``0.9 b*_0`` that cuts it (``nist_cut``; the start projected into the box); and the
    MGH least-squares problems with the bounds of ``bounds_mgh`` (``mgh_cut``). Both stop at
    ``ftol = xtol = gtol = 1e-10`` (ours: the driver's rules, ``gtol`` on the projected
    gradient). A run is solved when its final cost ``0.5 |r|^2`` is within
    ``1e-6 * |best| + 1e-12`` of the best known: the lowest cost any run of either method
    reached on that bounded problem (from either start), and for ``nist_positive`` the
    certified one (every soo_func iterate is asserted in the box; scipy's final point is
    checked in it). Evaluations, counted alike: residual
    evaluations plus Jacobian columns, scipy ``nfev + n * njev``, ours
    ``num_value_evals + num_residual_evals + num_grad_evals + num_hvp_evals`` (the driver's
    start value and gradient included).
``bounds_least_squares_summary``
    Per problem group and in total: solved counts and, over the runs both solve, the median
    per-run evaluation ratio (ours / scipy's).
"""

from __future__ import annotations

import functools
import math
import statistics

import numpy as np
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.nist import NIST, optimum_cut_bounds, positivity_bounds
from benchmarks.problems import LEAST_SQUARES, UNCONSTRAINED, Problem, scipy_funcs

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


LS_TOL = 1e-10
LS_QUICK = {"nist": ("Misra1a", "DanWood", "Rat42", "MGH09"), "mgh": QUICK_PROBLEMS}


def ls_ours(residual_fn, x0: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> dict:
    """``sf.trust_region_reflective`` from ``x0``, every iterate asserted in the box."""

    def inside(row, params):
        if not bool(((params >= lower) & (params <= upper)).all()):
            raise AssertionError(f"step {row['step']} left the box")

    result = sf.least_squares(residual_fn, x0.clone(), sf.trust_region_reflective(lower, upper),
                              gtol=LS_TOL, ftol=LS_TOL, xtol=LS_TOL, max_steps=MAX_STEPS,
                              callback=inside)  # fmt: skip
    evals = (result.num_value_evals + result.num_residual_evals + result.num_grad_evals
             + result.num_hvp_evals)  # fmt: skip
    return {"cost": float(result.value), "evals": evals, "feasible": True}


def ls_scipy(residual_fn, x0: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> dict:
    """``scipy.optimize.least_squares(method="trf")`` with the exact Jacobian."""

    def fun(x):
        return residual_fn(torch.from_numpy(x)).numpy()

    def jac(x):
        return torch.func.jacfwd(residual_fn)(torch.from_numpy(x)).numpy()

    lo, hi = lower.numpy(), upper.numpy()
    start = np.clip(x0.numpy(), lo, hi)
    result = scipy.optimize.least_squares(fun, start, jac=jac, bounds=(lo, hi), method="trf",
                                          ftol=LS_TOL, xtol=LS_TOL, gtol=LS_TOL,
                                          max_nfev=5 * MAX_STEPS)  # fmt: skip
    feasible = bool(np.all((result.x >= lo) & (result.x <= hi)))
    return {"cost": float(result.cost), "evals": int(result.nfev + x0.numel() * result.njev),
            "feasible": feasible}  # fmt: skip


def ls_cases(quick: bool):
    """``(group, problem, start, residual_fn, x0, lower, upper)`` of the bounded runs."""
    for name in LS_QUICK["nist"] if quick else tuple(NIST):
        problem = NIST[name]
        for group, (lower, upper) in (("nist_positive", positivity_bounds(problem)),
                                      ("nist_cut", optimum_cut_bounds(problem))):  # fmt: skip
            for start, x0 in enumerate(problem.starts(), start=1):
                x0 = torch.minimum(torch.maximum(x0, lower), upper)
                yield group, name, start, problem.residual_fn(), x0, lower, upper
    for name in LS_QUICK["mgh"] if quick else tuple(LEAST_SQUARES):
        lower, upper = cut_bounds(name)
        problem = LEAST_SQUARES[name]
        yield "mgh_cut", name, 1, problem.residual_fn, problem.x0.clone(), lower, upper


def best_known(runs: list[dict]) -> dict[tuple[str, str], float]:
    """The lowest cost per ``(group, problem)`` over both methods and both starts, and for
    ``nist_positive`` (bounds inactive at the certified optimum) the certified cost too."""
    best: dict[tuple[str, str], float] = {}
    for run in runs:
        key = (run["group"], run["problem"])
        costs = [c for c in (run["sf_cost"], run["scipy_cost"]) if math.isfinite(c)]
        if run["group"] == "nist_positive":
            costs.append(0.5 * NIST[run["problem"]].certified_rss)
        best[key] = min([best.get(key, math.inf), *costs])
    return best


def ls_rows(quick: bool) -> list[dict]:
    out = []
    for group, name, start, residual_fn, x0, lower, upper in ls_cases(quick):
        ours = ls_ours(residual_fn, x0, lower, upper)
        theirs = ls_scipy(residual_fn, x0, lower, upper)
        out.append({"group": group, "problem": name, "start": start, "sf_cost": ours["cost"],
                    "scipy_cost": theirs["cost"], "sf_feasible": ours["feasible"],
                    "scipy_feasible": theirs["feasible"], "sf_evals": ours["evals"],
                    "scipy_evals": theirs["evals"], "ratio": ours["evals"] / theirs["evals"]})  # fmt: skip
    best = best_known(out)
    for row in out:
        target = best[(row["group"], row["problem"])]
        tol = 1e-6 * abs(target) + 1e-12
        for who in ("sf", "scipy"):
            cost = row[f"{who}_cost"]
            row[f"{who}_solved"] = row.pop(f"{who}_feasible") and cost <= target + tol
    return out


def ls_summarize(table: list[dict]) -> list[dict]:
    groups = list(dict.fromkeys(r["group"] for r in table))
    out = []
    for group in [*groups, "total"]:
        runs = [r for r in table if group in ("total", r["group"])]
        both = [r["ratio"] for r in runs if r["sf_solved"] and r["scipy_solved"]]
        out.append({"group": group, "runs": len(runs),
                    "sf_solved": sum(r["sf_solved"] for r in runs),
                    "scipy_trf_solved": sum(r["scipy_solved"] for r in runs),
                    "both_solved": len(both),
                    "median_evals_ratio": statistics.median(both) if both else float("nan")})  # fmt: skip
    return out


def bounds_least_squares(quick: bool) -> list[dict]:
    return ls_rows(quick)


def bounds_least_squares_summary(quick: bool) -> list[dict]:
    return ls_summarize(ls_rows(quick))


SUITES.update(
    bounds_least_squares=bounds_least_squares,
    bounds_least_squares_summary=bounds_least_squares_summary,
)
