"""Dense BFGS per-iteration time against scipy's BFGS.

Suite ``dense_bfgs_speed`` (``python -m benchmarks.run --suite dense_bfgs_speed [--quick]``):
``chain(bfgs(), wolfe())`` and ``scipy.optimize.minimize(method="BFGS")`` on the extended
Rosenbrock function (a cheap objective, so the ``n x n`` update dominates) at n = 1,000 and
5,000 (``--quick``: 1,000 only), float64, each for the same number of iterations
(``STEPS``) from the standard start. Reported: seconds per iteration (wall and CPU of this
process), objective evaluations per iteration, the ratio ours / scipy, and the peak memory
of one of our updates in ``n x n`` buffers above the state already held
(``update_peak_nxn``, Linux). scipy's BFGS
update ``(I - rho s y^T) H (I - rho y s^T) + rho s s^T`` costs two ``n^3`` matrix products;
ours is ``O(n^2)`` (rank-one updates and matrix-vector products).
"""

from __future__ import annotations

import time

import scipy.optimize
import torch

import soo_func as sf

STEPS = 20


def extended_rosenbrock(x: torch.Tensor) -> torch.Tensor:
    odd, even = x[0::2], x[1::2]
    return (100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2).sum()


def start(n: int) -> torch.Tensor:
    x0 = torch.ones(n, dtype=torch.float64)
    x0[0::2] = -1.2
    return x0


def _timed(run) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def _proc_bytes(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if key in line)


def update_peak_buffers(n: int) -> float | None:
    """Peak memory of one ``bfgs`` update above what is held before it, in ``n x n`` float64
    buffers (the new matrix is one); Linux only (``/proc``: peak reset, then ``VmHWM``)."""
    grad, x, transform = torch.func.grad(extended_rosenbrock), start(n), sf.bfgs()
    d, state = transform.update(grad(x), transform.init(x), x)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _proc_bytes("VmRSS")
    except OSError:
        return None
    transform.update(grad(x + 1e-3 * d), state, x + 1e-3 * d)
    return (_proc_bytes("VmHWM") - before) / (8 * n * n)


def run_ours(n: int) -> dict:
    opt = sf.chain(sf.bfgs(), sf.wolfe())
    wall, cpu, res = _timed(
        lambda: sf.minimize(extended_rosenbrock, start(n), opt, max_steps=STEPS, gtol=0.0)
    )
    steps = max(res.num_steps, 1)
    return {"seconds_per_iter": wall / steps, "cpu_per_iter": cpu / steps,
            "evals_per_iter": res.num_value_evals / steps, "iters": res.num_steps,
            "value": float(res.value), "update_peak_nxn": update_peak_buffers(n)}  # fmt: skip


def run_scipy(n: int) -> dict:
    def fun(z):
        x = torch.from_numpy(z).requires_grad_(True)
        value = extended_rosenbrock(x)
        (grad,) = torch.autograd.grad(value, x)
        return float(value), grad.numpy()

    x0 = start(n).numpy()
    wall, cpu, res = _timed(lambda: scipy.optimize.minimize(
        fun, x0, jac=True, method="BFGS", options={"maxiter": STEPS, "gtol": 0.0}))  # fmt: skip
    steps = max(int(res.nit), 1)
    return {"seconds_per_iter": wall / steps, "cpu_per_iter": cpu / steps,
            "evals_per_iter": res.nfev / steps, "iters": int(res.nit),
            "value": float(res.fun)}  # fmt: skip


def dense_bfgs_speed(quick: bool) -> list[dict]:
    rows = []
    for n in (1000,) if quick else (1000, 5000):
        ours, theirs = run_ours(n), run_scipy(n)
        rows.append({"n": n, "method": "chain(bfgs(), wolfe())", **ours})
        rows.append({"n": n, "method": "scipy BFGS", **theirs})
        rows.append({"n": n, "method": "ratio ours/scipy",
                     "seconds_per_iter": ours["seconds_per_iter"] / theirs["seconds_per_iter"],
                     "cpu_per_iter": ours["cpu_per_iter"] / theirs["cpu_per_iter"]})  # fmt: skip
    return rows


SUITES = {"dense_bfgs_speed": dense_bfgs_speed}
