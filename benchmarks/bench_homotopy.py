"""Homotopy continuation benchmarks.

``homotopy_far_starts``: Moré-Garbow-Hillstrom problems from 10x and 100x their standard
starting points, Newton-Krylov with Armijo backtracking alone
(``chain(newton_krylov(), armijo())``) against the same wrapped in Keller's homotopy
(``chain(homotopy(), newton_krylov(), armijo())``). A run *solves* a problem when the
driver converged (``|grad|_inf <= gtol``) at a value within ``1e-4 |f*| + 1e-8`` of the
reference optimum ``f*``.

``homotopy_regularization_path``: an L2 regularization path of logistic regression (strong
to weak), :func:`soo_func.continuation_path` (warm start + tangent predictor, and warm
start only) against solving each value from the same start; total evaluations and the
largest distance to the from-scratch solutions.

Run: ``python -m benchmarks.run --suite homotopy_far_starts [--quick]`` or
``python -m benchmarks.bench_homotopy [--quick]``.
"""

from __future__ import annotations

import math
import sys
import time

import torch

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED

QUICK_PROBLEMS = ("rosenbrock", "beale", "helical_valley", "wood", "box_3d", "powell_singular")


def solved(result: sf.MinimizeResult, f_opt: float | None) -> bool:
    """Converged, at a value within ``1e-4 |f*| + 1e-8`` of the reference optimum."""
    if not result.converged or f_opt is None:
        return False
    return float(result.value) <= f_opt + 1e-4 * abs(f_opt) + 1e-8


def newton(homotopy: bool) -> sf.Transform:
    members = [sf.newton_krylov(), sf.armijo()]
    return sf.chain(sf.homotopy(), *members) if homotopy else sf.chain(*members)


def run_far_start(name: str, factor: float, homotopy: bool, max_steps: int, gtol: float) -> dict:
    problem = UNCONSTRAINED[name]
    x0 = problem.x0 * factor
    start = time.perf_counter()
    try:
        result = sf.minimize(problem.fn, x0, newton(homotopy), max_steps=max_steps, gtol=gtol)
        ok, value, steps = solved(result, problem.f_opt), float(result.value), result.num_steps
        evals = (result.num_value_evals, result.num_grad_evals, result.num_hvp_evals)
        reason = result.reason
    except (RuntimeError, ValueError) as err:  # a start where f is not finite, say
        ok, value, steps, evals, reason = False, math.nan, 0, (0, 0, 0), type(err).__name__
    return {
        "problem": name,
        "start": f"{factor:g}x",
        "method": "homotopy+newton" if homotopy else "newton",
        "solved": int(ok),
        "value": value,
        "steps": steps,
        "value_evals": evals[0],
        "grad_evals": evals[1],
        "hvp_evals": evals[2],
        "reason": reason[:30],
        "seconds": time.perf_counter() - start,
    }


def far_starts(quick: bool) -> list[dict]:
    names = QUICK_PROBLEMS if quick else tuple(UNCONSTRAINED)
    rows = []
    for factor in (10.0, 100.0):
        for name in names:
            for homotopy in (False, True):
                rows.append(run_far_start(name, factor, homotopy, max_steps=500, gtol=1e-6))
    for method in ("newton", "homotopy+newton"):
        mine = [r for r in rows if r["method"] == method]
        rows.append({
            "problem": "TOTAL", "start": "10x+100x", "method": method,
            "solved": sum(r["solved"] for r in mine), "value": math.nan,
            "steps": sum(r["steps"] for r in mine),
            "value_evals": sum(r["value_evals"] for r in mine),
            "grad_evals": sum(r["grad_evals"] for r in mine),
            "hvp_evals": sum(r["hvp_evals"] for r in mine), "reason": f"of {len(mine)}",
            "seconds": sum(r["seconds"] for r in mine),
        })  # fmt: skip
    return rows


def logistic_problem(n_samples: int, n_features: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n_samples, n_features, generator=gen, dtype=torch.float64)
    truth = torch.randn(n_features, generator=gen, dtype=torch.float64)
    noise = 0.5 * torch.randn(n_samples, generator=gen, dtype=torch.float64)
    labels = (features @ truth + noise > 0).double()

    def loss(w, lam):
        logits = features @ w
        data = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return data + 0.5 * lam * (w @ w)

    return loss, torch.zeros(n_features, dtype=torch.float64)


def regularization_path(quick: bool) -> list[dict]:
    loss, w0 = logistic_problem(200 if quick else 1000, 10 if quick else 50)
    schedule = [10.0 ** (-k / 4) for k in range(0, 9 if quick else 21)]  # 1 ... 1e-2 (1e-5)
    gtol = 1e-8
    rows = []
    scratch, counts = [], [0, 0, 0, 0]
    start = time.perf_counter()
    for lam in schedule:
        result = sf.minimize(
            lambda w, lam=lam: loss(w, torch.tensor(lam, dtype=torch.float64)),
            w0, newton(False), gtol=gtol, max_steps=200,
        )  # fmt: skip
        scratch.append(result.params)
        counts = [
            counts[0] + result.num_value_evals, counts[1] + result.num_grad_evals,
            counts[2] + result.num_hvp_evals, counts[3] + result.num_steps,
        ]  # fmt: skip
    rows.append({
        "method": "each from scratch", "points": len(schedule), "value_evals": counts[0],
        "grad_evals": counts[1], "hvp_evals": counts[2], "steps": counts[3],
        "max_dist_to_scratch": 0.0, "seconds": time.perf_counter() - start,
    })  # fmt: skip
    for predictor in ("tangent", "none"):
        start = time.perf_counter()
        path = sf.continuation_path(
            loss, w0, newton(False), schedule, gtol=gtol, max_steps=2000, predictor=predictor
        )
        dist = max(float((p - q).norm()) for p, q in zip(path.params, scratch, strict=True))
        rows.append({
            "method": f"continuation_path ({predictor})", "points": len(path.params),
            "value_evals": path.num_value_evals, "grad_evals": path.num_grad_evals,
            "hvp_evals": path.num_hvp_evals, "steps": path.num_steps,
            "max_dist_to_scratch": dist, "seconds": time.perf_counter() - start,
        })  # fmt: skip
    return rows


SUITES = {"homotopy_far_starts": far_starts, "homotopy_regularization_path": regularization_path}
DEFAULT = ["homotopy_regularization_path"]


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for suite, fn in SUITES.items():
        print(f"== {suite}")
        for row in fn(quick):
            print(row)
