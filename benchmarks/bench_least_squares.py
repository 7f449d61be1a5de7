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


def _scipy_lm(residual_fn, x0):
    def fun(x):
        return residual_fn(torch.from_numpy(x)).numpy()

    def jac(x):
        return torch.func.jacfwd(residual_fn)(torch.from_numpy(x)).numpy()

    return scipy.optimize.least_squares(
        fun, x0.numpy(), jac=jac, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
    )


def run_nist(quick: bool) -> list[dict]:
    rows = []
    names = ["Misra1a", "DanWood", "Rat42"] if quick else sorted(NIST)
    for name in names:
        problem = NIST[name]
        certified = np.array(problem.certified_params)
        residual_fn = problem.residual_fn()
        for start, x0 in enumerate(problem.starts(), start=1):
            ref = _scipy_lm(residual_fn, x0)
            res = sf.least_squares(residual_fn, x0, max_steps=1000, gtol=1e-14)
            ours = res.num_value_evals + res.num_grad_evals + res.num_hvp_evals
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


SUITES = {"nist_lm": run_nist}
DEFAULT = ["nist_lm"]

if __name__ == "__main__":
    for row in run_nist(quick=False):
        print(row)
