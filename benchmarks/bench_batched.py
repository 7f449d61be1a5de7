"""Batched solves with ``torch.func.vmap``: many small fits, many starts, side by side.

* ``batched_fits``: exponential-decay fits ``y = a exp(-b t) + c`` (3 parameters, 64
  points on ``t`` in [0, 4], noise 1% of ``a``, seeded; ``a`` in [0.5, 2.5], ``b`` in
  [0.5, 2], ``c`` in [-0.5, 0.5]; every fit starts at ``(1, 1, 0)``), 10,000 and 100,000 of
  them (1,000 and 3,000 quick). Ours: ``sf.batched_least_squares(residual, x0s,
  args=(ys,), max_steps=LM_STEPS)`` (the default ``levenberg_marquardt``, the vmapped
  sync-free driver, the stopped fits dropped from the batch after a step once at least a
  tenth of the round's have stopped: the defaults ``compact_every=1``,
  ``COMPACT_BELOW=0.9``). Peers: a
  Python loop of ``scipy.optimize.least_squares(method="lm")`` (MINPACK, its default
  finite-difference Jacobian) timed on the first ``SCIPY_SUBSET`` fits and extrapolated
  linearly to the whole batch, and torchimize's ``lsq_lma_parallel`` (analytic Jacobian,
  its defaults; skipped with a message when torchimize is not installed). Rows: wall and
  CPU seconds, ``speedup_vs_scipy`` / ``speedup_cpu_vs_scipy`` (the scipy loop's wall / CPU
  time over the method's; goal >= 10) and
  ``within_1e-3`` (fraction of the subset's fits whose parameters are within 1e-3 of
  scipy's, max norm; goal 1.0).
* ``multistart``: L-BFGS from 1,000 starts (100 quick) uniform in [-5, 5]^2 on Himmelblau's
  function (four minima, all with value 0). Ours: ``chain(lbfgs(), armijo_sync_free())``
  vmapped by ``sf.batched_minimize``, ``MULTISTART_STEPS`` steps.
  Peer: a Python loop of ``sf.minimize`` with the same chain (default tolerances). Rows:
  time, ``speedup`` (loop / vmapped; goal >= 20), the minima each found, the fraction of
  starts that end at the same minimum.

* ``batched_step_compiled``: the vmapped Levenberg-Marquardt step of ``batched_fits``
  (16,384 fits; 2,048 quick) eager against ``torch.compile(vmap(step), fullgraph=True)``:
  CPU time of ``LM_STEPS`` steps after the compile, the compile's CPU time, and the largest
  gap between the two runs' params.

Run: ``python -m benchmarks.run --suite batched_fits --suite multistart [--quick]
[--device cuda]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import numpy as np
import scipy.optimize as so
import torch

import soo_func as sf
from benchmarks.run import bench_device, main
from benchmarks.sync_free_loops import Clock, lbfgs_batched, lbfgs_chain, lm_batched

try:
    from torchimize.functions import lsq_lma_parallel
except ImportError:  # an optional peer (the bench extra installs it)
    lsq_lma_parallel = None

LM_STEPS = 10  # every fit agrees with scipy to 3e-7 from 10 steps on (2,000 fits); all 10,000 have stopped by then
SCIPY_SUBSET = 1000
MULTISTART_STEPS = 40
TRIALS = 4
FIT_REPEATS = {
    10_000: 3
}  # runs of every method at that count (the least CPU time kept); 1 elsewhere
POINTS = 64
START = (1.0, 1.0, 0.0)
HIMMELBLAU_MINIMA = (
    (3.0, 2.0),
    (-2.805118, 3.131312),
    (-3.779310, -3.283186),
    (3.584428, -1.848126),
)


def decay_data(count: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, y)``: the sample points (64) and ``count`` noisy curves (count x 64), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 4.0, POINTS, dtype=dtype)
    unit = torch.rand(count, 3, generator=gen, dtype=dtype)
    a, b, c = 0.5 + 2.0 * unit[:, :1], 0.5 + 1.5 * unit[:, 1:2], unit[:, 2:] - 0.5
    noise = torch.randn(count, POINTS, generator=gen, dtype=dtype)
    return t, a * torch.exp(-b * t) + c + 0.01 * a * noise


def decay_residual(t: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``r(p, y) = p0 exp(-p1 t) + p2 - y`` for one problem."""

    def residual(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    return residual


def fit_ours(t: torch.Tensor, y: torch.Tensor, steps: int = LM_STEPS) -> tuple[np.ndarray, Clock]:
    """Vmapped Levenberg-Marquardt on the device; ``(params (count x 3), clock)``."""
    device = bench_device()
    t, y = t.to(device), y.to(device)
    x0 = torch.tensor(START, dtype=y.dtype, device=device).expand(len(y), 3).clone()
    with Clock() as clock:
        params = lm_batched(decay_residual(t), x0, y, steps)
    return params.cpu().numpy(), clock


def fit_scipy(t: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, Clock]:
    """A Python loop of ``scipy.optimize.least_squares(method="lm")``."""
    tn, yn = t.numpy(), y.numpy()
    out = np.empty((len(yn), 3))
    with Clock() as clock:
        for i, yi in enumerate(yn):
            fun = lambda p, yi=yi: p[0] * np.exp(-p[1] * tn) + p[2] - yi  # noqa: E731
            out[i] = so.least_squares(fun, np.array(START), method="lm").x
    return out, clock


def fit_torchimize(t: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, Clock] | None:
    """torchimize's ``lsq_lma_parallel`` with the analytic Jacobian; ``None`` when missing."""
    if lsq_lma_parallel is None:
        return None
    device = bench_device()
    t, y = t.to(device), y.to(device)

    def fun(p: torch.Tensor) -> torch.Tensor:  # (count, 1 cost, 64 points)
        return (p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:] - y)[:, None]

    def jac(p: torch.Tensor) -> torch.Tensor:  # (count, 1, 64, 3)
        e = torch.exp(-p[:, 1:2] * t)
        return torch.stack([e, -p[:, :1] * t * e, torch.ones_like(e)], dim=-1)[:, None]

    x0 = torch.tensor(START, dtype=y.dtype, device=device).expand(len(y), 3).clone()
    with Clock() as clock:
        params = lsq_lma_parallel(x0, fun, jac_function=jac)[-1]
    return params.cpu().numpy(), clock


def least_cpu(fit: Callable, repeats: int, t: torch.Tensor, y: torch.Tensor):
    """``fit(t, y)`` run ``repeats`` times: the run with the least CPU time (``None`` when the
    peer is missing). The same for every method, so the ratios compare like with like on a
    loaded machine."""
    runs = [fit(t, y) for _ in range(repeats)]
    if runs[0] is None:
        return None
    return min(runs, key=lambda run: run[1].cpu)


def _fit_rows(count: int, scipy_params: np.ndarray, scipy_clock: tuple, fits: dict) -> list:
    """One row per method; ``scipy_clock`` is the loop's (wall, CPU) seconds, extrapolated."""
    rows = []
    for method, (params, clock) in fits.items():
        subset = params[: len(scipy_params)]
        close = np.abs(subset - scipy_params).max(axis=1) <= 1e-3
        rows.append(
            {
                "fits": count,
                "device": bench_device(),
                "method": method,
                "seconds": round(clock.wall, 3),
                "cpu_seconds": round(clock.cpu, 3),
                "speedup_vs_scipy": round(scipy_clock[0] / clock.wall, 2),
                "speedup_cpu_vs_scipy": round(scipy_clock[1] / clock.cpu, 2),
                "within_1e-3": round(float(close.mean()), 4),
            }
        )
    return rows


def batched_fits(quick: bool, counts: tuple[int, ...] | None = None, subset: int = SCIPY_SUBSET):
    """The fit counts (10,000 and 100,000; quick 1,000 and 3,000): every method run
    ``FIT_REPEATS`` times at a count (least CPU time kept), once where none is given."""
    counts = counts or ((1_000, 3_000) if quick else (10_000, 100_000))
    rows = []
    t, y = decay_data(4)
    fit_ours(t, y, steps=2)  # warm-up
    fit_torchimize(t, y)
    for count in counts:
        t, y = decay_data(count)
        subset_n = min(subset, count)
        repeats = FIT_REPEATS.get(count, 1)
        scipy_params, scipy_clock = least_cpu(fit_scipy, repeats, t, y[:subset_n])
        scale = count / subset_n
        fits = {"soo_func vmap levenberg_marquardt": least_cpu(fit_ours, repeats, t, y)}
        peer = least_cpu(fit_torchimize, repeats, t, y)
        if peer is None:
            print("torchimize is not installed: its row is skipped", file=sys.stderr)
        else:
            fits["torchimize lsq_lma_parallel"] = peer
        scipy_seconds = scipy_clock.wall * scale
        rows += _fit_rows(count, scipy_params, (scipy_seconds, scipy_clock.cpu * scale), fits)
        rows.append(
            {
                "fits": count,
                "device": "cpu",
                "method": f"scipy lm loop ({subset_n} timed, x{scale:g} extrapolated)",
                "seconds": round(scipy_seconds, 3),
                "cpu_seconds": round(scipy_clock.cpu * scale, 3),
                "speedup_vs_scipy": 1.0,
                "speedup_cpu_vs_scipy": 1.0,
                "within_1e-3": 1.0,
            }
        )
    return rows


def himmelblau(x: torch.Tensor) -> torch.Tensor:
    """``(x^2 + y - 11)^2 + (x + y^2 - 7)^2``: four minima with value 0."""
    return (x[0] ** 2 + x[1] - 11) ** 2 + (x[0] + x[1] ** 2 - 7) ** 2


def nearest_minimum(points: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """The index of the known minimum within ``tol`` of each point (-1: none)."""
    minima = np.array(HIMMELBLAU_MINIMA)
    dist = np.linalg.norm(points[:, None, :] - minima[None], axis=-1)
    return np.where(dist.min(axis=1) <= tol, dist.argmin(axis=1), -1)


def multistart(quick: bool, starts: int | None = None, steps: int = MULTISTART_STEPS):
    """Vmapped multistart L-BFGS against a loop of single ``sf.minimize`` solves."""
    count = starts or (100 if quick else 1_000)
    gen = torch.Generator().manual_seed(0)
    x0s = (10.0 * torch.rand(count, 2, generator=gen, dtype=torch.float64) - 5.0).to(bench_device())
    lbfgs_batched(himmelblau, x0s[:2], 2, TRIALS)  # warm-up
    with Clock() as ours_clock:
        ours = lbfgs_batched(himmelblau, x0s, steps, TRIALS).cpu().numpy()
    with Clock() as loop_clock:
        loop = np.stack(
            [
                sf.minimize(himmelblau, x0, lbfgs_chain(TRIALS), max_steps=steps)
                .params.cpu()
                .numpy()
                for x0 in x0s
            ]
        )
    ours_min, loop_min = nearest_minimum(ours), nearest_minimum(loop)

    def found(labels: np.ndarray) -> str:
        return " ".join(str(i) for i in sorted(set(labels.tolist()) - {-1}))

    return [
        {
            "starts": count,
            "device": bench_device(),
            "vmap_seconds": round(ours_clock.wall, 3),
            "loop_seconds": round(loop_clock.wall, 3),
            "speedup": round(loop_clock.wall / ours_clock.wall, 2),
            "speedup_cpu": round(loop_clock.cpu / max(ours_clock.cpu, 1e-9), 2),
            "vmap_minima": found(ours_min),
            "loop_minima": found(loop_min),
            "minima_agree": found(ours_min) == found(loop_min),
            "same_minimum_frac": round(float((ours_min == loop_min).mean()), 4),
            "vmap_unconverged": int((ours_min == -1).sum()),
            "loop_unconverged": int((loop_min == -1).sum()),
            "worst_vmap_value": float(max(himmelblau(torch.tensor(p)) for p in ours)),
        }
    ]


def vmapped_lm_step(t: torch.Tensor) -> Callable:
    """``(params, state, y) -> (params+, state+)``: one ``levenberg_marquardt`` update of a
    batch of decay fits (value, gradient and update per fit, under ``torch.func.vmap``)."""
    residual, opt = decay_residual(t), sf.levenberg_marquardt()

    def one(p: torch.Tensor, state, y: torch.Tensor):
        fit = partial(residual, y=y)

        def value_fn(q: torch.Tensor) -> torch.Tensor:
            return 0.5 * (fit(q) ** 2).sum()

        grad, value = torch.func.grad_and_value(value_fn)(p)
        updates, state = opt.update(
            grad, state, p, value=value, grad=grad, value_fn=value_fn, residual_fn=fit
        )
        return p + updates, state

    return torch.func.vmap(one), opt.init


def compiled_step(
    quick: bool, count: int | None = None, steps: int = LM_STEPS, backend: str = "inductor"
) -> list[dict]:
    """The vmapped Levenberg-Marquardt step of ``batched_fits`` (16,384 fits; 2,048 quick),
    eager against ``torch.compile(vmap(step), fullgraph=True)`` (inductor): ``steps`` steps
    timed after a warm-up (the compile's CPU time reported apart), the params compared."""
    count = count or (2_048 if quick else 16_384)
    device = bench_device()
    t, y = (tensor.to(device) for tensor in decay_data(count))
    step, init = vmapped_lm_step(t)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x0 = torch.tensor(START, dtype=y.dtype, device=device).expand(count, 3).clone()

    def run(fn: Callable, n: int) -> torch.Tensor:
        p, state = x0, torch.func.vmap(init)(x0)
        for _ in range(n):
            p, state = fn(p, state, y)
        return p

    with Clock() as compile_clock:
        run(compiled, 2)  # the first update fills the Jacobian cache: two graphs
    clocks, params = {}, {}
    for name, fn in (("eager vmap", step), ("compiled vmap", compiled)):
        with Clock() as clocks[name]:
            params[name] = run(fn, steps)
    eager_cpu = clocks["eager vmap"].cpu
    gap = float((params["compiled vmap"] - params["eager vmap"]).abs().max())
    return [
        {
            "fits": count,
            "steps": steps,
            "method": name,
            "cpu_seconds": round(clock.cpu, 3),
            "seconds": round(clock.wall, 3),
            "cpu_vs_eager": round(clock.cpu / eager_cpu, 3),
            "compile_cpu_seconds": round(compile_clock.cpu, 1) if name != "eager vmap" else 0.0,
            "max_param_gap": gap,
        }
        for name, clock in clocks.items()
    ]


SUITES = {
    "batched_fits": batched_fits,
    "multistart": multistart,
    "batched_step_compiled": compiled_step,
}


if __name__ == "__main__":  # the runner parses --quick and --device
    sys.exit(main(["--suite", "batched_fits", "--suite", "multistart", *sys.argv[1:]]))
