"""Least squares: soo_func's Levenberg-Marquardt against scipy's MINPACK ``lm``.

Both get the same exact Jacobian (torch autograd). Rows: problem, start, whether each
reached the certified parameters to 6 significant digits (NIST) or the known optimum
(MGH), and the residual-evaluation counts (each Jacobian product counted as one; scipy:
``nfev + n * njev``) with their ratio.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.nist import NIST


def _scipy_lm(residual_fn, x0, **kwargs):
    def fun(x):
        return residual_fn(torch.from_numpy(x)).numpy()

    def jac(x):
        return torch.func.jacfwd(residual_fn)(torch.from_numpy(x)).numpy()

    return scipy.optimize.least_squares(fun, x0.numpy(), jac=jac, method="lm", **kwargs)


def run_nist(quick: bool) -> list[dict]:
    rows = []
    names = ["Misra1a", "DanWood", "Rat42"] if quick else sorted(NIST)
    for name in names:
        problem = NIST[name]
        certified = np.array(problem.certified_params)
        residual_fn = problem.residual_fn()
        for start, x0 in enumerate(problem.starts(), start=1):
            ref = _scipy_lm(residual_fn, x0, xtol=1e-15, ftol=1e-15, gtol=1e-15)
            res = sf.least_squares(residual_fn, x0, max_steps=1000, gtol=1e-14)
            ours = (
                res.num_value_evals
                + res.num_residual_evals
                + res.num_grad_evals
                + res.num_hvp_evals
            )
            peer = ref.nfev + problem.n * ref.njev
            rows.append(
                {
                    "problem": name,
                    "start": start,
                    "sf_ok": int(
                        np.all(np.abs(res.params.numpy() - certified) <= 1e-6 * np.abs(certified))
                    ),
                    "scipy_ok": int(np.all(np.abs(ref.x - certified) <= 1e-6 * np.abs(certified))),
                    "sf_evals": ours,
                    "scipy_evals": peer,
                    "ratio": ours / peer,
                }
            )
    return rows


MODES = {
    "dense_more": lambda: sf.levenberg_marquardt(solver="dense", damping_rule="more"),
    "dense_nielsen": lambda: sf.levenberg_marquardt(solver="dense", damping_rule="nielsen"),
    "cg_marquardt": lambda: sf.levenberg_marquardt(solver="cg"),
    "cg_levenberg": lambda: sf.levenberg(solver="cg"),
}


def run_mgh_modes(quick: bool) -> list[dict]:
    """Per mode: MGH least-squares problems solved (ours, scipy lm) and the median
    evaluation ratio over the problems both solve (as tests/test_least_squares_problems)."""
    from benchmarks.problems import LEAST_SQUARES

    names = list(LEAST_SQUARES)[:8] if quick else list(LEAST_SQUARES)
    refs = {n: _scipy_lm(LEAST_SQUARES[n].residual_fn, LEAST_SQUARES[n].x0) for n in names}
    rows = []
    for mode, make in MODES.items():
        ours, peer, ratios = 0, 0, []
        for name in names:
            problem, ref = LEAST_SQUARES[name], refs[name]
            res = sf.least_squares(
                problem.residual_fn, problem.x0.clone(), make(), max_steps=1000, gtol=1e-8
            )
            target = problem.f_opt
            if target is None:
                target = 2 * min(ref.cost, float(res.value))
            tol = 1e-6 + 1e-4 * abs(target)
            peer_ok, ours_ok = 2 * ref.cost <= target + tol, 2 * float(res.value) <= target + tol
            peer, ours = peer + peer_ok, ours + ours_ok
            if peer_ok and ours_ok:
                evals = (
                    res.num_value_evals
                    + res.num_residual_evals
                    + res.num_grad_evals
                    + res.num_hvp_evals
                )
                ratios.append(evals / (ref.nfev + problem.n * ref.njev))
        rows.append(
            {
                "mode": mode,
                "problems": len(names),
                "sf_solved": ours,
                "scipy_solved": peer,
                "median_ratio": float(np.median(ratios)),
            }
        )
    return rows


SUITES = {"nist_lm": run_nist, "mgh_lm_modes": run_mgh_modes}
DEFAULT = ["nist_lm"]

if __name__ == "__main__":
    for row in run_nist(quick=False) + run_mgh_modes(quick=False):
        print(row)
