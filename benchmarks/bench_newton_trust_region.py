"""Newton-Krylov with a trust region against scipy's ``trust-ncg``: Hessian products.

Suites (``python -m benchmarks.run --suite NAME [--quick]``):

``newton_trust_region_mgh``
    ``chain(newton_krylov(), trust_region())`` (the defaults a user gets) and scipy's
    ``trust-ncg`` on the Moré-Garbow-Hillstrom problems
    (:data:`benchmarks.problems.UNCONSTRAINED`), both stopped at the first iterate with
    ``||grad||_inf <= 1e-5`` (:func:`benchmarks.bench_krylov.run_ours` and
    ``run_scipy``): per problem, solved, objective evaluations, gradients and Hessian
    products (scipy's ``hessp`` calls; soo_func's ``num_hvp_evals``, where a linearized
    operator's shared gradient pass counts as one product).
``newton_trust_region_mgh_summary``
    Problems solved by each, and over the problems both solve the median Hessian products
    and evaluations per solve, their ratio of medians and the median per-problem ratio.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import soo_func as sf
from benchmarks.bench_krylov import QUICK_PROBLEMS, run_ours, run_scipy
from benchmarks.problems import UNCONSTRAINED

OURS = "newton_krylov+trust_region"
PEER = "scipy trust-ncg"


def ours() -> sf.Transform:
    return sf.chain(sf.newton_krylov(), sf.trust_region())


def rows(quick: bool, make: Callable[[], sf.Transform] = ours) -> list[dict]:
    names = QUICK_PROBLEMS if quick else tuple(UNCONSTRAINED)
    out = []
    for name in names:
        problem = UNCONSTRAINED[name]
        out.append({"problem": name, "method": OURS, **run_ours(problem, make)})
        out.append({"problem": name, "method": PEER, **run_scipy(problem, "trust-ncg")})
    return out


def _ratio_of_medians(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b) if a else float("nan")


def summarize(table: list[dict]) -> list[dict]:
    """Solved counts; medians over the problems both solve (see the module docstring)."""
    by = {(r["problem"], r["method"]): r for r in table}
    problems = list(dict.fromkeys(r["problem"] for r in table))
    both = [p for p in problems if by[(p, OURS)]["solved"] and by[(p, PEER)]["solved"]]
    summary = {
        "problems": len(problems),
        "solved": sum(by[(p, OURS)]["solved"] for p in problems),
        "peer_solved": sum(by[(p, PEER)]["solved"] for p in problems),
        "both_solved": len(both),
    }
    for key, label in (("hvp_evals", "hvp"), ("value_evals", "evals")):
        mine = [by[(p, OURS)][key] for p in both]
        theirs = [by[(p, PEER)][key] for p in both]
        summary[f"median_{label}"] = statistics.median(mine) if mine else float("nan")
        summary[f"peer_median_{label}"] = statistics.median(theirs) if theirs else float("nan")
        summary[f"{label}_ratio_of_medians"] = _ratio_of_medians(mine, theirs)
        summary[f"median_{label}_ratio"] = (
            statistics.median(m / max(t, 1) for m, t in zip(mine, theirs, strict=True))
            if mine
            else float("nan")
        )
    return [{"method": OURS, "peer": PEER, **summary}]


def newton_trust_region_mgh(quick: bool) -> list[dict]:
    return rows(quick)


def newton_trust_region_mgh_summary(quick: bool) -> list[dict]:
    return summarize(rows(quick))


SUITES = {
    "newton_trust_region_mgh": newton_trust_region_mgh,
    "newton_trust_region_mgh_summary": newton_trust_region_mgh_summary,
}
