"""Newton-Krylov and nonlinear CG against scipy, and the cost of Hessian-vector products.

Suites (``python -m benchmarks.run --suite NAME [--quick]``):

``krylov_mgh``
    ``chain(newton_krylov(), armijo())`` against scipy's ``trust-ncg`` and ``Newton-CG``,
    and ``chain(nonlinear_cg(beta), wolfe(c2=0.1))`` against scipy's ``CG``, on the
    Moré-Garbow-Hillstrom problems (:data:`benchmarks.problems.UNCONSTRAINED`). Every
    run stops at the first iterate with ``||grad||_inf <= gtol`` (scipy through a
    callback that raises ``StopIteration``, so ``Newton-CG``, which has no ``gtol``,
    is judged by the same rule); the row reports whether it got there and the
    objective evaluations spent (scipy's ``nfev``, soo_func's ``num_value_evals``).
``krylov_mgh_summary``
    Per method: problems solved, and the median ratio of evaluations to the scipy
    peer's on the problems both solve.
``hvp_timing``
    Seconds per gradient and per Hessian-vector product on an MLP and a small conv
    net with GroupNorm: forward-over-reverse (``jvp`` of ``grad``), reverse-over-reverse
    (``vjp`` of ``grad``) and ``linearize_grad`` (one gradient pass, then k products
    through the saved graph; the per-product cost is amortized over k = 10), as ratios
    to one gradient measured in the same run.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED, Problem, scipy_funcs

GTOL = 1e-5
MAX_STEPS = 500
QUICK_PROBLEMS = ("rosenbrock", "beale", "helical_valley", "wood", "extended_rosenbrock",
                  "penalty1", "trigonometric", "chebyquad")  # fmt: skip


def ours_newton() -> sf.Transform:
    return sf.chain(sf.newton_krylov(), sf.armijo())


def ours_cg(beta: str) -> Callable[[], sf.Transform]:
    return lambda: sf.chain(sf.nonlinear_cg(beta), sf.wolfe(c2=0.1))


OURS: dict[str, Callable[[], sf.Transform]] = {
    "newton_krylov+armijo": ours_newton,
    "nonlinear_cg(polak_ribiere)+wolfe": ours_cg("polak_ribiere"),
    "nonlinear_cg(polak_ribiere_plus)+wolfe": ours_cg("polak_ribiere_plus"),
    "nonlinear_cg(hestenes_stiefel)+wolfe": ours_cg("hestenes_stiefel"),
    "nonlinear_cg(hs_dy)+wolfe": ours_cg("hs_dy"),
    "nonlinear_cg(hager_zhang)+wolfe": ours_cg("hager_zhang"),
}
PEER = {name: ("trust-ncg" if name.startswith("newton") else "CG") for name in OURS}


def run_ours(problem: Problem, make: Callable[[], sf.Transform], max_steps: int = MAX_STEPS):
    """soo_func from the standard start; stops at ``||grad||_inf <= GTOL``."""
    start = time.perf_counter()
    res = sf.minimize(problem.fn, problem.x0.clone(), make(), max_steps=max_steps, gtol=GTOL)
    return {
        "solved": bool(res.converged),
        "value": float(res.value),
        "value_evals": res.num_value_evals,
        "grad_evals": res.num_grad_evals,
        "hvp_evals": res.num_hvp_evals,
        "steps": res.num_steps,
        "seconds": time.perf_counter() - start,
    }


def run_scipy(problem: Problem, method: str, max_steps: int = MAX_STEPS):
    """scipy from the standard start, stopped by the same ``||grad||_inf <= GTOL`` rule."""
    funcs = scipy_funcs(problem)
    counts = {"fun": 0, "jac": 0, "hessp": 0}

    def fun(x):
        counts["fun"] += 1
        return funcs.fun(x)

    def jac(x):
        counts["jac"] += 1
        return funcs.jac(x)

    def hessp(x, p):
        counts["hessp"] += 1
        return funcs.hessp(x, p)

    reached = {}

    def callback(intermediate_result):
        x = intermediate_result.x
        if float(np.max(np.abs(funcs.jac(x)))) <= GTOL:
            reached.update(counts, value=float(funcs.fun(x)))
            raise StopIteration

    start = time.perf_counter()
    if float(np.max(np.abs(funcs.jac(problem.x0.numpy())))) <= GTOL:
        reached.update(counts, value=float(funcs.fun(problem.x0.numpy())))
    else:
        kwargs = {"hessp": hessp} if method in ("trust-ncg", "Newton-CG") else {}
        options = {"maxiter": max_steps}
        if method in ("CG", "trust-ncg"):
            options["gtol"] = GTOL / 100  # our callback stops first, on the inf norm
        if method == "Newton-CG":
            options["xtol"] = 1e-14
        res = scipy.optimize.minimize(fun, problem.x0.numpy(), jac=jac, method=method,
                                      callback=callback, options=options, **kwargs)  # fmt: skip
        if not reached:
            reached.update(counts, value=float(res.fun), unsolved=True)
    return {
        "solved": "unsolved" not in reached,
        "value": reached["value"],
        "value_evals": reached["fun"],
        "grad_evals": reached["jac"],
        "hvp_evals": reached["hessp"],
        "steps": -1,
        "seconds": time.perf_counter() - start,
    }


def mgh_rows(quick: bool, methods: dict[str, Callable[[], sf.Transform]] | None = None):
    names = QUICK_PROBLEMS if quick else tuple(UNCONSTRAINED)
    methods = OURS if methods is None else methods
    peers = sorted({PEER.get(m, "CG") for m in methods} | ({"Newton-CG"} if not quick else set()))
    rows = []
    for name in names:
        problem = UNCONSTRAINED[name]
        for label, make in methods.items():
            rows.append({"problem": name, "method": label, **run_ours(problem, make)})
        for method in peers:
            rows.append(
                {"problem": name, "method": f"scipy {method}", **run_scipy(problem, method)}
            )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Solved counts and median evaluation ratios against each method's scipy peer."""
    by = {(r["problem"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    out = []
    for method in methods:
        peer = "scipy " + PEER.get(method, "") if method in PEER else None
        solved = [p for p in problems if by[(p, method)]["solved"]]
        row = {"method": method, "solved": len(solved), "problems": len(problems)}
        if peer is not None and (problems[0], peer) in by:
            both = [p for p in solved if by[(p, peer)]["solved"]]
            ratios = [by[(p, method)]["value_evals"] / max(by[(p, peer)]["value_evals"], 1)
                      for p in both]  # fmt: skip
            row.update(
                peer=peer,
                peer_solved=sum(by[(p, peer)]["solved"] for p in problems),
                both_solved=len(both),
                median_evals=statistics.median(by[(p, method)]["value_evals"] for p in both),
                peer_median_evals=statistics.median(by[(p, peer)]["value_evals"] for p in both),
                median_eval_ratio=statistics.median(ratios) if ratios else float("nan"),
            )
        out.append(row)
    return out


def krylov_mgh(quick: bool) -> list[dict]:
    return mgh_rows(quick)


def krylov_mgh_summary(quick: bool) -> list[dict]:
    return summarize(mgh_rows(quick))


# ----------------------------------------------------------------------------- HVP timing


def _mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, width), torch.nn.Tanh(),
        torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 10),
    )  # fmt: skip


def _convnet(channels: int) -> torch.nn.Module:
    c = channels
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.GroupNorm(4, c), torch.nn.ReLU(),
        torch.nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), torch.nn.GroupNorm(4, 2 * c),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(2 * c, 10),
    )  # fmt: skip


def _timing_problems(quick: bool, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    batch = 64 if quick else 256
    size = 16 if quick else 32
    specs = {
        "mlp": (_mlp(128 if quick else 512), (batch, 1, 28, 28)),
        "convnet_groupnorm": (_convnet(16 if quick else 32), (batch // 2, 3, size, size)),
    }
    for name, (module, shape) in specs.items():
        module = module.to(device)
        inputs = torch.randn(*shape, generator=gen).to(device)
        targets = torch.randint(0, 10, (shape[0],), generator=gen).to(device)
        loss_fn, params = sf.functional_loss(module, torch.nn.functional.cross_entropy)
        value_fn = functools.partial(loss_fn, batch=(inputs, targets))

        def model_fn(p, module=module, inputs=inputs):
            return torch.func.functional_call(module, p, (inputs,))

        def output_loss(logits, targets=targets):
            return torch.nn.functional.cross_entropy(logits, targets)

        yield name, (model_fn, output_loss), value_fn, params


def _seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``reps`` runs after two warm-ups."""
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _autograd_double_backward(value_fn, params, products: int):
    """Plain ``torch.autograd``: one ``create_graph`` gradient, then double-backward products."""
    names = list(params)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    loss = value_fn(dict(zip(names, leaves, strict=True)))
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    vs = [torch.ones_like(x) for x in leaves]
    for _ in range(products):
        torch.autograd.grad(grads, leaves, vs, retain_graph=True)


def _routes(value_fn, params, v, k: int, model) -> dict[str, Callable[[], object]]:
    def linearized():
        op = sf.oracles.hvp_operator(value_fn, params)
        for _ in range(k):
            op(v)

    def ggn():
        _, op = sf.oracles.ggn_operator(model[0], params, model[1])
        for _ in range(k):
            op(v)

    return {
        "gradient (value_and_grad)": lambda: sf.value_and_grad(value_fn)(params),
        "hvp forward-over-reverse": lambda: sf.hvp(value_fn, params, v),
        "hvp reverse-over-reverse": lambda: sf.hvp(
            value_fn, params, v, mode="reverse-over-reverse"
        ),
        "hvp_operator linearize, 1 product": lambda: sf.oracles.hvp_operator(value_fn, params)(v),
        f"hvp_operator linearize, per product of {k}": linearized,
        f"autograd double-backward, per product of {k}": lambda: _autograd_double_backward(
            value_fn, params, k
        ),
        f"GGN ggn_operator (J^T H_L J), per product of {k}": ggn,
    }


def hvp_timing(quick: bool) -> list[dict]:
    """Seconds per gradient and per Hessian-vector product, and their ratio (goal <= 2.5)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    reps = 5 if quick else 20
    k = 10
    rows = []
    for device in devices:
        for name, model, value_fn, params in _timing_problems(quick, device):
            n = sum(p.numel() for p in params.values())

            routes = _routes(value_fn, params, sf.tree.ones_like(params), k, model)
            base = None
            for route, fn in routes.items():
                seconds = _seconds(fn, device, reps)
                if "per product" in route:
                    seconds /= k
                base = seconds if base is None else base
                rows.append({
                    "model": name, "params": n, "device": device.type, "route": route,
                    "ms": 1e3 * seconds, "ratio_to_gradient": seconds / base,
                })  # fmt: skip
    return rows


SUITES = {
    "krylov_mgh": krylov_mgh,
    "krylov_mgh_summary": krylov_mgh_summary,
    "hvp_timing": hvp_timing,
}
DEFAULT = ["hvp_timing"]

if __name__ == "__main__":
    from benchmarks.run import format_table

    print(format_table(hvp_timing(quick=True)))
