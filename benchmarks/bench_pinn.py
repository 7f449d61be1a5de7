"""PINN suites: Adam warm start, then each method for the same CPU-time budget.

The problems are those of Rathore et al. (ICML 2024) in :mod:`benchmarks.pinn`:
convection (``beta``) and reaction (``rho``), a tanh MLP in float64, the loss
``0.5 ||r||^2`` of the stacked, size-normalized residuals. For every seed the network is
initialized and warm-started by Adam (``torch.optim.Adam``, lr 1e-3, the same iterations
for all), then every method starts from that same point and runs until its budget of
*process* time (``time.process_time``; run with ``OMP_NUM_THREADS=1`` so that it is
one core's time) is spent. The CPU clock is the budget because the machine is shared: a
method slowed down by another process's load is not charged for it; wall time is
recorded alongside. Every ``budget / checkpoints`` seconds the run records (CPU time, wall
time, loss, L2 relative error); the error is computed with both clocks paused, so it is
not charged to the method.

Methods (:data:`METHODS`): ``torch_lbfgs`` (the peer, ``torch.optim.LBFGS(history_size=100,
line_search_fn="strong_wolfe")`` stepped with its default ``max_iter=20`` per call, as
users run it; tolerances 0 so that it runs the whole budget), soo_func's
``chain(lbfgs(100), wolfe())``, a damped Newton-CG (``newton_krylov("cg", damping)``
with ``trust_region()``: plain truncated Newton-CG in a trust region, not Rathore's
Nystrom-preconditioned NNCG), and, where soo_func has them, the self-scaled dense
quasi-Newton methods ``chain(ssbfgs(), wolfe())`` and ``chain(ssbroyden(), wolfe())``.
soo_func methods run through :func:`soo_func.minimize` with ``gtol=0`` and a callback that
stops them at the budget.

The rows: per PDE and method, the median over seeds of the final L2RE and its ratio to
``torch_lbfgs``'s median (``< 1``: lower error), the median final loss, iterations and
CPU seconds, and the median loss on independent collocation points
(:func:`benchmarks.pinn.fresh_collocation`; far above the training loss: a false solution
that only interpolates the training points). Full size (:data:`FULL_SIZES`, per PDE: tanh MLP
3 x 20, 1,000 interior points for convection and 5,000 for reaction, whose 1,000-point
residuals the network can interpolate; 1,000 Adam steps, 30 CPU seconds per method, 3
seeds; about 20 minutes of CPU with five methods), one command::

    OMP_NUM_THREADS=1 python -m benchmarks.run --suite pinn --json benchmarks/results/pinn.json

writes the curves to ``benchmarks/results/pinn_curves.json`` and the plots (median
L2RE against CPU time, one panel per PDE) to ``benchmarks/results/pinn.png``;
``--suite pinn_convection`` / ``pinn_reaction`` run one PDE (two processes at once on two
free cores). ``pinn_quick`` (in ``make bench``'s default bundle) is the ``--quick`` size,
seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import soo_func as sf
from benchmarks import pinn
from benchmarks.run import format_table

RESULTS = Path(__file__).resolve().parent / "results"
PEER = "torch_lbfgs"


@dataclass(frozen=True)
class Size:
    """One benchmark size: network, collocation points, Adam warm start, budget, seeds."""

    width: int
    depth: int
    points: tuple[int, int, int]  # interior, initial, boundary
    adam_iters: int
    budget: float  # CPU seconds per method and seed
    seeds: int
    checkpoints: int = 60  # records of (time, loss, L2RE) per method and seed


# Per PDE: reaction needs more interior points than convection, at 1,000 its 1,356 residuals
# are 1.5 x the 921 parameters and the network can interpolate them (a false solution).
FULL_SIZES = {
    "convection": Size(20, 3, points=(1000, 256, 100), adam_iters=1000, budget=30.0, seeds=3),
    "reaction": Size(20, 3, points=(5000, 256, 100), adam_iters=1000, budget=30.0, seeds=3),
}
FULL = FULL_SIZES["convection"]  # the full size of the convection notebook
QUICK = Size(
    width=10, depth=2, points=(200, 64, 32), adam_iters=50, budget=0.3, seeds=1, checkpoints=10
)
FRESH_POINTS = 5000  # interior points of the independent generalization set
PROBLEMS = {
    "convection": lambda s: pinn.convection(20.0, s),
    "reaction": lambda s: pinn.reaction(5.0, s),
}


class Clock:
    """Process and wall time, paused while the error is measured."""

    def __init__(self) -> None:
        self.cpu = self.wall = 0.0
        self.resume()

    def resume(self) -> None:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

    def pause(self) -> None:
        self.cpu += time.process_time() - self._cpu0
        self.wall += time.perf_counter() - self._wall0


@dataclass
class Recorder:
    """Records ``(cpu, wall, loss, l2re, iterations, fresh_loss)`` at the checkpoints (the
    last: the loss on independent collocation points); says when the budget is spent."""

    problem: pinn.PINNProblem
    model: pinn.TanhMLP
    value: Callable[[pinn.Params], torch.Tensor]
    fresh: Callable[[pinn.Params], torch.Tensor]
    budget: float
    checkpoints: int
    clock: Clock = field(default_factory=Clock)
    trace: list[tuple[float, float, float, float, int, float]] = field(default_factory=list)
    next_at: float = 0.0
    last_params: pinn.Params | None = None

    def tick(self, params: pinn.Params, loss: float | None, iterations: int) -> bool:
        """After an iteration: record when a checkpoint was passed; ``True``: stop.
        ``loss=None``: evaluated here, off the clock (a peer that does not report it)."""
        self.clock.pause()
        if loss is None:
            with torch.no_grad():
                loss = float(self.value(params))
        done = self.clock.cpu >= self.budget or not math.isfinite(loss)
        if done or self.clock.cpu >= self.next_at:
            error = pinn.l2_relative_error(self.problem, self.model, params)
            with torch.no_grad():
                fresh = float(self.fresh(params))
            self.trace.append((self.clock.cpu, self.clock.wall, loss, error, iterations, fresh))
            self.last_params = {k: v.detach().clone() for k, v in params.items()}
            self.next_at = self.clock.cpu + self.budget / self.checkpoints
        self.clock.resume()
        return done


def run_torch_lbfgs(value, start: pinn.Params, recorder: Recorder) -> str:
    """``torch.optim.LBFGS`` on the module's parameters, ``step(closure)`` repeated."""
    model = recorder.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start[name])
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        history_size=100,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    own = dict(model.named_parameters())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = value(own)
        loss.backward()
        return loss

    while True:
        optimizer.step(closure)
        iterations = optimizer.state[own[next(iter(own))]]["n_iter"]
        params = {k: p.detach() for k, p in own.items()}
        if recorder.tick(params, None, iterations):
            return "budget"


def soo_func_runner(make: Callable[[], sf.Transform]) -> Callable:
    """A runner of ``sf.minimize(value, start, make())`` stopped by the recorder."""

    def run(value, start: pinn.Params, recorder: Recorder) -> str:
        def callback(row, params) -> bool:
            return recorder.tick(params, row["value"], row["step"])

        result = sf.minimize(value, start, make(), max_steps=10**9, gtol=0.0, callback=callback)
        if result.reason != "callback":  # stopped by itself: record where
            recorder.tick(result.params, float(result.value), result.num_steps)
        return result.reason

    return run


def method_registry() -> dict[str, Callable]:
    """The methods compared; the self-scaled ones where this soo_func has them."""
    methods = {
        PEER: run_torch_lbfgs,
        "lbfgs": soo_func_runner(lambda: sf.chain(sf.lbfgs(100), sf.wolfe())),
        "newton_cg": soo_func_runner(
            lambda: sf.chain(sf.newton_krylov("cg", damping=1e-8), sf.trust_region())
        ),
    }
    for name in ("ssbfgs", "ssbroyden"):
        if hasattr(sf, name):
            direction = getattr(sf, name)
            methods[name] = soo_func_runner(lambda d=direction: sf.chain(d(), sf.wolfe()))
    return methods


METHODS = method_registry()


def adam_warm_start(value, model: pinn.TanhMLP, params: pinn.Params, iters: int):
    """``iters`` Adam steps (lr 1e-3) from ``params``; the new params and CPU seconds."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    own = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.process_time()
    for _ in range(iters):
        optimizer.zero_grad()
        value(own).backward()
        optimizer.step()
    return {k: p.detach().clone() for k, p in own.items()}, time.process_time() - start


def run_seed(
    name: str, size: Size, seed: int, methods: dict[str, Callable], keep_params: bool = False
) -> dict:
    """One seed of one PDE: warm start, then every method; their traces and reasons (and
    final params with ``keep_params``)."""
    problem = PROBLEMS[name](size.points)
    model, init = pinn.make_model(size.width, size.depth, seed)
    value = pinn.value_fn(problem, model)
    fresh = pinn.value_fn(pinn.fresh_collocation(problem, FRESH_POINTS), model)
    start, adam_cpu = adam_warm_start(value, model, init, size.adam_iters)
    out = {
        "label": problem.label,
        "adam_cpu": adam_cpu,
        "adam_loss": float(value(start)),
        "adam_l2re": pinn.l2_relative_error(problem, model, start),
        "adam_fresh_loss": float(fresh(start)),
        "methods": {},
    }
    for method, run in methods.items():
        recorder = Recorder(problem, model, value, fresh, size.budget, size.checkpoints)
        first = (0.0, 0.0, out["adam_loss"], out["adam_l2re"], 0, out["adam_fresh_loss"])
        recorder.trace.append(first)
        recorder.next_at = size.budget / size.checkpoints
        recorder.clock = Clock()
        reason = run(value, start, recorder)
        out["methods"][method] = {"trace": recorder.trace, "reason": reason}
        if keep_params:
            out["methods"][method]["params"] = recorder.last_params
    return out


def median_curve(traces: list[list], budget: float, points: int = 100) -> list[tuple]:
    """Median over seeds of the error last recorded at or before each CPU time."""
    grid = [budget * i / points for i in range(points + 1)]
    curve = []
    for t in grid:
        errors = [next((r[3] for r in reversed(tr) if r[0] <= t), tr[0][3]) for tr in traces]
        curve.append((t, statistics.median(errors)))
    return curve


def summary_rows(runs: list[dict], size: Size) -> list[dict]:
    """Per method: medians over seeds of the final record; ratio of L2RE to the peer's."""
    rows = []
    for method in runs[0]["methods"]:
        finals = [run["methods"][method]["trace"][-1] for run in runs]
        reasons = {run["methods"][method]["reason"] for run in runs}
        rows.append(
            {
                "pde": runs[0]["label"],
                "method": method,
                "l2re": statistics.median(f[3] for f in finals),
                "l2re_seeds": " ".join(f"{f[3]:.2e}" for f in finals),
                "loss": statistics.median(f[2] for f in finals),
                "fresh_loss": statistics.median(f[5] if len(f) > 5 else math.nan for f in finals),
                "iters": statistics.median(f[4] for f in finals),
                "cpu_s": statistics.median(f[0] for f in finals),
                "wall_s": statistics.median(f[1] for f in finals),
                "stop": "/".join(sorted(reasons)),
            }
        )
    peer = next((r["l2re"] for r in rows if r["method"] == PEER), math.nan)
    for row in rows:
        row["l2re_vs_peer"] = row["l2re"] / peer if peer > 0 else math.nan
    adam = statistics.median(run["adam_l2re"] for run in runs)
    start = {"pde": runs[0]["label"], "method": f"adam_{size.adam_iters}_start", "l2re": adam}
    return [start, *rows]


def plot(results: dict[str, list[dict]], sizes: dict[str, Size], path: Path) -> None:
    """Median L2RE against CPU time, one panel per PDE (skipped without matplotlib)."""
    try:
        import matplotlib  # optional: the plots are skipped without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items(), strict=True):
        for method in runs[0]["methods"]:
            traces = [run["methods"][method]["trace"] for run in runs]
            curve = median_curve(traces, sizes[name].budget)
            ax.semilogy([c[0] for c in curve], [c[1] for c in curve], label=method)
        ax.set_title(f"{runs[0]['label']} (median of {len(runs)} seeds)")
        ax.set_xlabel("CPU seconds after the Adam warm start")
        ax.set_ylabel("L2 relative error")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pdes(names: list[str], quick: bool, tag: str, methods: list[str] | None = None):
    """The suite body: every seed of every PDE (``methods``: a subset of :data:`METHODS`),
    then rows; at full size also the curves JSON (rewritten after every seed) and plot."""
    sizes = {name: QUICK if quick else FULL_SIZES[name] for name in names}
    chosen = {m: METHODS[m] for m in methods} if methods else METHODS
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for seed in range(max(s.seeds for s in sizes.values())):  # seed-major: a stopped run
        for name in names:  # has every PDE's first seeds
            if seed < sizes[name].seeds:
                results[name].append(run_seed(name, sizes[name], seed, chosen))
            if not quick:
                save_curves(results, sizes, RESULTS / f"{tag}_curves.json")
    if not quick:
        plot(results, sizes, RESULTS / f"{tag}.png")
    return [row for name, runs in results.items() for row in summary_rows(runs, sizes[name])]


def save_curves(results: dict[str, list[dict]], sizes: dict[str, Size], path: Path) -> None:
    """The traces of every run so far and each PDE's size as JSON (:func:`merge` reads
    them back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    as_dicts = {name: size.__dict__ for name, size in sizes.items()}
    path.write_text(json.dumps({"sizes": as_dicts, "runs": results}))


def merge(paths: list[Path]) -> tuple[dict[str, list[dict]], dict[str, Size]]:
    """The runs of several curves files (methods run separately on the same seeds: the
    Adam warm start is deterministic) as one result per PDE and seed; the PDEs' sizes
    (files of the first suite, with one ``size`` for all PDEs, are read too)."""
    merged: dict[str, list[dict]] = {}
    sizes: dict[str, Size] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name, runs in data["runs"].items():
            size = data["sizes"][name] if "sizes" in data else data["size"]
            sizes[name] = Size(**{**size, "points": tuple(size["points"])})
            into = merged.setdefault(name, [])
            for seed, run in enumerate(runs):
                if seed < len(into):
                    into[seed]["methods"].update(run["methods"])
                else:
                    into.append(run)
    return merged, sizes


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.bench_pinn --merge A.json B.json --tag pinn_merged``: one
    table and plot from separately run methods; otherwise runs (``--pde``, ``--methods``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_pinn")
    parser.add_argument("--pde", action="append", choices=sorted(PROBLEMS))
    parser.add_argument("--methods", help="comma-separated subset of the methods")
    parser.add_argument("--tag", default="pinn_part")
    parser.add_argument("--merge", nargs="+", help="curves JSON files to combine")
    args = parser.parse_args(argv)
    if args.merge:
        results, sizes = merge(args.merge)
        rows = [row for n, runs in results.items() for row in summary_rows(runs, sizes[n])]
        save_curves(results, sizes, RESULTS / f"{args.tag}_curves.json")
        plot(results, sizes, RESULTS / f"{args.tag}.png")
    else:
        methods = args.methods.split(",") if args.methods else None
        rows = run_pdes(args.pde or sorted(PROBLEMS), False, args.tag, methods)
    print(format_table(rows))


SUITES = {
    "pinn": lambda quick: run_pdes(["convection", "reaction"], quick, "pinn"),
    "pinn_convection": lambda quick: run_pdes(["convection"], quick, "pinn_convection"),
    "pinn_reaction": lambda quick: run_pdes(["reaction"], quick, "pinn_reaction"),
    # make bench's entry (the default bundle runs without --quick): the quick size always
    "pinn_quick": lambda quick: run_pdes(["convection", "reaction"], True, "pinn_quick"),
}
DEFAULT = ["pinn_quick"]

if __name__ == "__main__":
    main()
