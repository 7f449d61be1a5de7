"""The bundled default comparison: soo_func optimizers against scipy on classic problems.

Runs ``sf.minimize`` with whatever directions and searches exist when it is imported
(each guarded with ``hasattr``, so the suite works while the library grows) and scipy's
``L-BFGS-B`` and ``BFGS`` (with torch autograd gradients) on a handful of
Moré-Garbow-Hillstrom problems and on L2-regularized logistic regression on
scikit-learn's breast-cancer data (standardized). All in float64 on the CPU, with the
same gradient tolerance (``||g||_inf <= gtol``). Reports the final value, the number
of value and gradient evaluations, whether it converged, and wall-clock seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED, Problem, scipy_funcs

GTOL = 1e-5
PROBLEMS = ["rosenbrock", "beale", "helical_valley", "wood", "extended_rosenbrock", "penalty2"]
QUICK_PROBLEMS = ["rosenbrock", "helical_valley", "wood", "extended_rosenbrock"]


def _find(name: str):
    """``soo_func.<name>``, or the same name in ``soo_func.directions`` / ``soo_func.searches``."""
    for module in (sf, getattr(sf, "directions", None), getattr(sf, "searches", None)):
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    return None


def soo_func_optimizers(baseline: bool = True) -> dict[str, Callable[[], sf.Transform]]:
    """The optimizers available in this checkout, by label (each built fresh per run)."""
    import soo_func.directions
    import soo_func.searches  # noqa: F401

    wolfe, armijo = _find("wolfe"), _find("armijo")
    candidates: dict[str, Callable[[], sf.Transform]] = {}
    for direction in ("lbfgs", "bfgs", "newton_krylov", "nonlinear_cg"):
        make_direction = _find(direction)
        if make_direction is None:
            continue
        if wolfe is not None:
            candidates[f"sf {direction}+wolfe"] = lambda d=make_direction: sf.chain(d(), wolfe())
        elif armijo is not None:
            candidates[f"sf {direction}+armijo"] = lambda d=make_direction: sf.chain(d(), armijo())
    if armijo is not None and (baseline or not candidates):
        candidates["sf gradient+armijo"] = lambda: sf.chain(sf.scale(-1.0), armijo())
    if not candidates:
        candidates["sf sgd(1e-3)"] = lambda: sf.sgd(1e-3)
    return candidates


def logistic_regression() -> Problem:
    """Mean logistic loss + 1e-3/2 ||w||^2 on standardized breast-cancer data (31 unknowns)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = torch.as_tensor(data.data, dtype=torch.float64)
    features = (features - features.mean(0)) / features.std(0)
    labels = torch.as_tensor(data.target, dtype=torch.float64)
    design = torch.cat([features, torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        logits = design.to(x.dtype) @ x
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(x.dtype))
        return loss + 0.5e-3 * torch.sum(x[:-1] ** 2)

    n = design.shape[1]
    return Problem("breast_cancer_logreg", n, fn, torch.zeros(n, dtype=torch.float64), None)


def _run_soo_func(problem: Problem, make: Callable[[], sf.Transform], max_steps: int) -> dict:
    start = time.perf_counter()
    result = sf.minimize(problem.fn, problem.x0.clone(), make(), max_steps=max_steps, gtol=GTOL)
    seconds = time.perf_counter() - start
    return {
        "value": float(result.value),
        "value_evals": result.num_value_evals,
        "grad_evals": result.num_grad_evals,
        "steps": result.num_steps,
        "converged": bool(result.converged),
        "seconds": seconds,
    }


def _run_scipy(problem: Problem, method: str, max_steps: int) -> dict:
    funcs = scipy_funcs(problem)
    options = {"maxiter": max_steps, "gtol": GTOL}
    if method == "L-BFGS-B":
        options = {"maxiter": max_steps, "gtol": GTOL, "ftol": 0.0, "maxfun": 20 * max_steps}
    start = time.perf_counter()
    res = scipy.optimize.minimize(
        funcs.fun, problem.x0.numpy(), jac=funcs.jac, method=method, options=options
    )
    seconds = time.perf_counter() - start
    grad_inf = float(np.max(np.abs(funcs.jac(res.x))))
    return {
        "value": float(res.fun),
        "value_evals": int(res.nfev),
        "grad_evals": int(getattr(res, "njev", res.nfev)),
        "steps": int(res.nit),
        "converged": grad_inf <= GTOL,
        "seconds": seconds,
    }


def classic(quick: bool, baseline: bool = True) -> list[dict]:
    """soo_func and scipy on MGH problems and breast-cancer logistic regression."""
    names = QUICK_PROBLEMS if quick else PROBLEMS
    problems = [UNCONSTRAINED[n] for n in names] + [logistic_regression()]
    max_steps = 500 if quick else 2000
    rows = []
    for problem in problems:
        f_opt = problem.f_opt if problem.f_opt is not None else float("nan")
        for label, make in soo_func_optimizers(baseline).items():
            run = _run_soo_func(problem, make, max_steps)
            rows.append({"problem": problem.name, "optimizer": label, "f_opt": f_opt, **run})
        for method in ("L-BFGS-B", "BFGS"):
            run = _run_scipy(problem, method, max_steps)
            rows.append(
                {"problem": problem.name, "optimizer": f"scipy {method}", "f_opt": f_opt, **run}
            )
    return rows


def classic_quick(quick: bool) -> list[dict]:
    """The bundled default (``make bench``): quick sizes, no gradient-descent baseline."""
    del quick
    return classic(quick=True, baseline=False)


SUITES = {"classic": classic, "classic_quick": classic_quick}
DEFAULT = ["classic_quick"]

if __name__ == "__main__":
    from benchmarks.run import format_table

    print(format_table(classic(quick=True)))
