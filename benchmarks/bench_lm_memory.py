"""Levenberg-Marquardt memory on a PINN-sized least-squares problem.

Suite ``lm_memory`` (``python -m benchmarks.run --suite lm_memory [--quick]``): the
convection equation ``u_t + beta u_x = 0`` on ``[0, 2 pi] x [0, 1]`` with ``u(x, 0) =
sin x`` and periodic ``u(0, t) = u(2 pi, t)``, a tanh MLP ``u(x, t)`` (3 hidden layers of
50: 5,301 float64 parameters) and 2,300 stacked residuals (2,000 collocation points, 200
initial, 100 boundary pairs); ``--quick``: width 20, 460 residuals. Each variant runs
``STEPS`` steps of ``sf.least_squares`` in its own subprocess under an address-space cap
(``CAP_FRACTION`` of the available memory, so that a variant that would exhaust the
machine fails alone), and reports its mode, peak RSS (``ru_maxrss``), the peak over the
process before the run, wall and CPU seconds per step and the final loss (from the
``tau`` start the first few trial steps of this problem are rejected while the damping
grows, so ``STEPS`` steps measure memory and time, not convergence):

* ``old default`` -- what ``levenberg_marquardt()`` did before the memory modes: CG, with
  Marquardt's ``diag(J^T J)`` from one ``jacfwd`` over all ``n`` columns per step
  (reproduced by ``solver="cg"``, one chunk and no remembered residual count);
* ``new default`` -- ``levenberg_marquardt()``: the Jacobian within the budget, built in
  chunks (rows by ``vjp`` here, ``m < n``), Moré's rule on its thin SVD;
* ``new matrix-free`` -- ``levenberg_marquardt(max_jacobian_bytes=1)``: CG with the
  damping diagonal accumulated chunk by chunk (what a Jacobian over the budget gets;
  ``--quick`` only: its CG steps take minutes at the full size).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.func as tf

import soo_func as sf
from soo_func import tree
from soo_func.searches import levenberg_jacobian
from soo_func.searches.levenberg import levenberg_mode
from soo_func.searches.levenberg_jacobian import available_memory

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
BETA = 5.0
CAP_FRACTION = 0.5
SIZES = {"quick": (20, 400, 40, 20), "full": (50, 2000, 200, 100)}  # width, pde, initial, bc
VARIANTS = ("old default", "new default", "new matrix-free")


def mlp(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2 -> width -> width -> width -> 1 tanh MLP's parameters (Glorot-like)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [2, width, width, width, 1]
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = torch.randn(b, a, generator=g, dtype=torch.float64) / math.sqrt(a)
        params[f"b{i}"] = torch.zeros(b, dtype=torch.float64)
    return params


def _u(p: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    layers = len(p) // 2
    for i in range(layers):
        z = z @ p[f"w{i}"].T + p[f"b{i}"]
        if i < layers - 1:
            z = torch.tanh(z)
    return z[:, 0]


def convection(pde: int, initial: int, boundary: int, seed: int = 1):
    """The stacked residuals ``[u_t + beta u_x; u(x, 0) - sin x; u(0, t) - u(2 pi, t)]``."""
    g = torch.Generator().manual_seed(seed)
    two_pi = 2 * math.pi
    xt = torch.rand(pde, 2, generator=g, dtype=torch.float64) * torch.tensor([two_pi, 1.0])
    x0 = torch.rand(initial, generator=g, dtype=torch.float64) * two_pi
    t_b = torch.rand(boundary, generator=g, dtype=torch.float64)
    start = torch.stack([x0, torch.zeros_like(x0)], 1)
    left = torch.stack([torch.zeros_like(t_b), t_b], 1)
    right = torch.stack([torch.full_like(t_b, two_pi), t_b], 1)
    e_x = torch.tensor([1.0, 0.0], dtype=torch.float64).expand_as(xt)
    e_t = torch.tensor([0.0, 1.0], dtype=torch.float64).expand_as(xt)

    def residual(p: dict[str, torch.Tensor]) -> torch.Tensor:
        u_t = tf.jvp(lambda z: _u(p, z), (xt,), (e_t,))[1]
        u_x = tf.jvp(lambda z: _u(p, z), (xt,), (e_x,))[1]
        return torch.cat(
            [u_t + BETA * u_x, _u(p, start) - torch.sin(x0), _u(p, left) - _u(p, right)]
        )

    return residual


def _optimizer(variant: str, n: int) -> sf.Transform:
    if variant == "old default":
        levenberg_jacobian.known_rows = lambda fn: None  # each Jacobian as one jacfwd
        return sf.levenberg_marquardt(solver="cg", chunk_size=n)
    if variant == "new matrix-free":
        return sf.levenberg_marquardt(max_jacobian_bytes=1)
    return sf.levenberg_marquardt()


def run_variant(variant: str, size: str) -> dict:
    """One variant in this process (the subprocess's body)."""
    torch.set_num_threads(1)
    width, pde, initial, boundary = SIZES[size]
    residual, params = convection(pde, initial, boundary), mlp(width)
    n = tree.ravel(params).flat.numel()
    loss0 = float(0.5 * residual(params).square().sum())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    res = sf.least_squares(residual, params, _optimizer(variant, n), max_steps=STEPS, gtol=0.0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps = max(int(res.num_steps), 1)
    return {"mode": levenberg_mode(res.state) or "-", "m": pde + initial + boundary, "n": n,
            "peak_rss_mib": peak / 1024, "run_peak_mib": (peak - before) / 1024,
            "seconds_per_step": wall / steps, "cpu_per_step": cpu / steps,
            "loss0": loss0, "loss": float(res.value), "reduction": 1 - float(res.value) / loss0,
            "steps": steps}  # fmt: skip


def _in_subprocess(variant: str, size: str, cap: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
        "from benchmarks.bench_lm_memory import run_variant\n"
        f"print(json.dumps(run_variant({variant!r}, {size!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode == 0:
        return {"status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}
    err = out.stderr.lower()
    if out.returncode < 0 or any(s in err for s in ("memoryerror", "out of memory", "alloc")):
        return {"status": "out of memory"}  # the driver re-raises with its own last line
    return {"status": f"failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:80]}"}


def run_lm_memory(quick: bool) -> list[dict]:
    size = "quick" if quick else "full"
    cap = int(CAP_FRACTION * available_memory(torch.device("cpu")))
    rows = []
    for variant in VARIANTS if quick else VARIANTS[:2]:  # matrix-free CG: slow at full size
        row = {"variant": variant, "size": size, "cap_gib": cap / 2**30}
        rows.append({**row, **_in_subprocess(variant, size, cap)})
    return rows


SUITES = {"lm_memory": run_lm_memory}

if __name__ == "__main__":
    for row in run_lm_memory(quick="--quick" in sys.argv):
        print(row)
