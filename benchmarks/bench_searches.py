"""Line searches against their peers, ray by ray and in full minimizations.

``line_search_rays``: ``sf.wolfe`` against ``scipy.optimize.line_search`` (the same
``c1``, ``c2``) on rays of the Moré-Garbow-Hillstrom problems (``benchmarks.problems``):
the starting point and a few perturbations of it, along steepest descent (``-g``, badly
scaled: the step is far from 1) and Newton (``-H^{-1} g`` where that is a descent
direction: the unit step is usually right). Per direction kind and ``c2``: how often each
search succeeds and meets strong Wolfe (checked on the numbers), the mean evaluations
per search, the mean decrease ``phi(0) - phi(alpha)`` relative to scipy's, and the
wall-clock ratio (ours / scipy, measured in the same run on the same rays).

``search_minimize``: full minimizations with ``sf.minimize`` (steepest descent and
L-BFGS, each with ``armijo`` and ``wolfe``) against scipy's L-BFGS-B, gradient
evaluations and convergence (``||g||_inf <= 1e-5``).

Run: ``python -m benchmarks.run --suite line_search_rays [--quick]`` or
``python -m benchmarks.bench_searches``.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED, scipy_funcs

QUICK_PROBLEMS = ["rosenbrock", "beale", "helical_valley", "wood", "biggs_exp6", "watson"]
C1 = 1e-4


def _rays(problem, num_points: int, seed: int = 0):
    """(x, d, kind) triples: the starting point and perturbations, steepest descent and Newton."""
    gen = torch.Generator().manual_seed(seed)
    x0 = problem.x0.double()
    points = [x0] + [
        x0 + 0.1 * (x0.abs() + 1) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        for _ in range(num_points - 1)
    ]
    for x in points:
        g = torch.func.grad(problem.fn)(x)
        if not torch.isfinite(g).all() or float(g.norm()) == 0:
            continue
        yield x, -g, "steepest"
        h = torch.func.hessian(problem.fn)(x)
        try:
            newton = -torch.linalg.solve(h, g)
        except RuntimeError:
            continue
        if torch.isfinite(newton).all() and float(newton @ g) < 0:
            yield x, newton, "newton"


def _strong_wolfe(fn, x, d, alpha, c2) -> bool:
    if alpha is None or not math.isfinite(alpha) or alpha <= 0:
        return False
    f0, g0 = sf.value_and_grad(fn)(x)
    fa, ga = sf.value_and_grad(fn)(x + alpha * d)
    slope0, slope_a = float(g0 @ d), float(ga @ d)
    sufficient = float(fa) <= float(f0) + C1 * alpha * slope0 + 1e-12 * abs(float(f0))
    return sufficient and abs(slope_a) <= c2 * abs(slope0) * (1 + 1e-9)


def _ours(fn, x, d, c2):
    search = sf.wolfe(c1=C1, c2=c2)
    value, grad = sf.value_and_grad(fn)(x)
    start = time.perf_counter()
    _, state = search.update(d, search.init(x), x, value=value, grad=grad, value_fn=fn)
    seconds = time.perf_counter() - start
    failed = bool(state.search_failed)
    alpha = float(state.step_size)
    return (None if failed else alpha), int(state.num_search_evals), seconds


def _scipy(funcs, x, d, c2):
    xn, dn = x.numpy(), d.numpy()
    g0, f0 = funcs.jac(xn), funcs.fun(xn)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alpha, fc, gc, *_ = scipy.optimize.line_search(
            funcs.fun, funcs.jac, xn, dn, g0, f0, c1=C1, c2=c2
        )
    return alpha, fc, gc, time.perf_counter() - start


def line_search_rays(quick: bool) -> list[dict]:
    names = QUICK_PROBLEMS if quick else list(UNCONSTRAINED)
    num_points = 2 if quick else 5
    stats: dict[tuple[str, float], dict[str, list]] = {}
    for name in names:
        problem = UNCONSTRAINED[name]
        funcs = scipy_funcs(problem)
        for x, d, kind in _rays(problem, num_points):
            for c2 in (0.9, 0.1):
                s = stats.setdefault(
                    (kind, c2), {k: [] for k in ["ok", "sok", "ev", "sev", "st", "sst", "dec"]}
                )
                alpha, evals, seconds = _ours(problem.fn, x, d, c2)
                s_alpha, fc, gc, s_seconds = _scipy(funcs, x, d, c2)
                ok, s_ok = (
                    _strong_wolfe(problem.fn, x, d, alpha, c2),
                    _strong_wolfe(problem.fn, x, d, s_alpha, c2),
                )
                s["ok"].append(ok)
                s["sok"].append(s_ok)
                s["ev"].append(evals)
                s["sev"].append(max(fc, gc))
                s["st"].append(seconds)
                s["sst"].append(s_seconds)
                if ok and s_ok:
                    f0 = float(problem.fn(x))
                    ours = f0 - float(problem.fn(x + alpha * d))
                    theirs = f0 - float(problem.fn(x + s_alpha * d))
                    if theirs > 0:
                        s["dec"].append(ours / theirs)
    rows = []
    for (kind, c2), s in sorted(stats.items()):
        rows.append(
            {
                "direction": kind,
                "c2": c2,
                "rays": len(s["ok"]),
                "wolfe_ok": float(np.mean(s["ok"])),
                "scipy_ok": float(np.mean(s["sok"])),
                "wolfe_evals": float(np.mean(s["ev"])),
                "scipy_evals": float(np.mean(s["sev"])),
                "decrease_ratio_median": float(np.median(s["dec"])) if s["dec"] else math.nan,
                "time_ratio": float(np.sum(s["st"]) / np.sum(s["sst"])),
            }
        )
    return rows


def search_minimize(quick: bool) -> list[dict]:
    names = ["rosenbrock", "wood", "extended_rosenbrock"] if quick else QUICK_PROBLEMS
    optimizers = {
        "steepest+armijo": lambda: sf.chain(sf.scale(-1.0), sf.armijo()),
        "steepest+wolfe(prev)": lambda: sf.chain(
            sf.scale(-1.0), sf.wolfe(initial_step="previous_decrease")
        ),
    }
    import soo_func.directions

    lbfgs = getattr(sf, "lbfgs", None) or getattr(soo_func.directions, "lbfgs", None)
    if lbfgs is not None:
        optimizers["lbfgs+armijo"] = lambda: sf.chain(lbfgs(), sf.armijo())
        optimizers["lbfgs+wolfe"] = lambda: sf.chain(lbfgs(), sf.wolfe())
    rows = []
    for name in names:
        problem = UNCONSTRAINED[name]
        funcs = scipy_funcs(problem)
        ref = scipy.optimize.minimize(
            funcs.fun, problem.x0.numpy(), jac=funcs.jac, method="L-BFGS-B",
            options={"gtol": 1e-5, "maxiter": 5000},
        )  # fmt: skip
        for label, make in optimizers.items():
            result = sf.minimize(problem.fn, problem.x0.double(), make(), max_steps=5000, gtol=1e-5)
            rows.append(
                {
                    "problem": name,
                    "optimizer": label,
                    "converged": result.converged,
                    "steps": result.num_steps,
                    "grad_evals": result.num_grad_evals,
                    "value_evals": result.num_value_evals,
                    "scipy_lbfgsb_njev": int(ref.njev),
                    "grad_evals_ratio": result.num_grad_evals / max(int(ref.njev), 1),
                    "value": float(result.value),
                    "scipy_value": float(ref.fun),
                }
            )
    return rows


SUITES = {"line_search_rays": line_search_rays, "search_minimize": search_minimize}
DEFAULT = ["line_search_rays"]

if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    for suite, fn in SUITES.items():
        print(f"== {suite}")
        for row in fn(quick):
            print(row)
