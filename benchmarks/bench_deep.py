"""Deep-learning suites: a short version of :mod:`benchmarks.experiment`.

``deep_quick`` (in the default bundle, well under a minute on 2 cores): the MLP on
scikit-learn's digits (always available; upsampled to 28x28), SGD with momentum and
Adam from ``torch.optim`` against Hessian-free (subsampled GGN) and multi-batch
L-BFGS, each tuned over its 3-value grid, then rerun over seeds. Ratios are against
tuned Adam measured in the same run (``< 1`` means fewer epochs / less time).

``deep_fmnist``: the same on a 10k subset of Fashion-MNIST with the small ResNet
(minutes; needs the ``dataset-fashion-mnist`` package, digits otherwise).

``deep_compiled`` (issue 17, benchmark 4): Gauss-Newton + Armijo on the README's ResNet
(``resnet_s2``, width 16; batch 500, the GGN on 125 examples, 10 CG iterations, damping
0.1), the training step eager (``armijo``, deciding on the host) against the step compiled
once with inductor (:func:`soo_func.stochastic.training.make_training_step`,
``compile=True``; ``armijo_sync_free``, which decides on the device with ``torch.cond``),
and the eager sync-free step as the compiled one's exact peer. Seconds (wall and CPU) per
epoch without the first (compiling) step, and the test accuracy after each epoch, side by
side. ``SOO_FUNC_DEEP_COMPILED="train_size,test_size,epochs"`` sets the subset (default
``5000,2000,2``; quick: ``2000,1000,1``). Fashion-MNIST is read from ``FASHION_MNIST_DIR``
(the digits when absent).
"""

from __future__ import annotations

import os
import time

import torch

import soo_func as sf
import soo_func.stochastic.training as training
from benchmarks.data import load_dataset
from benchmarks.experiment import accuracy, available_methods, functional_model, run_experiment
from benchmarks.experiment_report import with_ratios

QUICK_METHODS = ["sgd", "adam", "hessian_free", "multi_batch_lbfgs"]


def deep_quick(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    data = load_dataset("digits")
    methods = [m for m in QUICK_METHODS if m in available_methods()]
    rows, _ = run_experiment(
        data,
        models=["mlp"],
        methods=methods,
        seeds=2 if quick else 3,
        epochs=2.0 if quick else 4.0,
        target=0.9,
        validation=200,
        verbose=False,
    )
    return with_ratios(rows)


def deep_fmnist(quick: bool) -> list[dict]:
    data = load_dataset("fashion-mnist", train_size=4000 if quick else 10000, test_size=2000)
    rows, _ = run_experiment(
        data,
        models=["resnet"],
        methods=list(available_methods()),
        seeds=2 if quick else 3,
        epochs=2.0 if quick else 3.0,
        target=0.75,
        validation=500,
        verbose=False,
    )
    return with_ratios(rows)


def _compiled_run(data, search, compile: bool, epochs: int, batch: int = 500) -> dict:
    """Train ``resnet_s2`` with ``chain(gauss_newton, search)``; per-epoch seconds and accuracy."""
    apply_fn, loss_fn, params = functional_model("resnet_s2", seed=0, device="cpu", width=16)
    optimizer = sf.chain(sf.gauss_newton(damping=0.1, max_iters=10), search)

    def extras_fn(p, b):
        sub = training.subsample(b, batch // 4)[0]
        return {"residual_fn": training.cross_entropy_ggn_residual(apply_fn, p, sub)}

    step = training.make_training_step(optimizer, loss_fn, extras_fn, compile=compile)
    state, gen, n = optimizer.init(params), torch.Generator().manual_seed(0), len(data.train_y)
    row: dict = {"wall_per_epoch": [], "cpu_per_epoch": [], "accuracy": [], "first_step_s": 0.0}
    for epoch in range(epochs):
        order, wall, cpu = torch.randperm(n, generator=gen), 0.0, 0.0
        for i in range(0, n - batch + 1, batch):
            idx = order[i : i + batch]
            start, start_cpu = time.perf_counter(), time.process_time()
            params, state, loss = step(params, state, (data.train_x[idx], data.train_y[idx]))
            float(loss)
            if epoch == 0 and i == 0:  # the compiling step: reported apart
                row["first_step_s"] = time.perf_counter() - start
                continue
            wall, cpu = wall + time.perf_counter() - start, cpu + time.process_time() - start_cpu
        steps = n // batch - (epoch == 0)
        row["wall_per_epoch"].append(wall * (n // batch) / steps)  # per full epoch of steps
        row["cpu_per_epoch"].append(cpu * (n // batch) / steps)
        row["accuracy"].append(accuracy(apply_fn, params, data.test_x, data.test_y))
    return row


def deep_compiled(quick: bool) -> list[dict]:
    """Benchmark 4 of issue 17 (module docstring)."""
    default = "2000,1000,1" if quick else "5000,2000,2"
    sizes = os.environ.get("SOO_FUNC_DEEP_COMPILED", default).split(",")
    train_size, test_size, epochs = (int(v) for v in sizes)
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", train_size=train_size, test_size=test_size)
    runs = {
        "eager (armijo)": (sf.armijo(), False),
        "eager (armijo_sync_free)": (sf.armijo_sync_free(), False),
        "compiled (armijo_sync_free)": (sf.armijo_sync_free(), True),
    }
    rows = []
    for name, (search, compile) in runs.items():
        torch._dynamo.reset()
        row = _compiled_run(data, search, compile, epochs)
        rows.append({"suite": "deep_compiled", "run": name, "data": data.name,
                     "train_size": train_size, **row})  # fmt: skip
    eager = rows[0]["wall_per_epoch"][-1]
    eager_cpu = rows[0]["cpu_per_epoch"][-1]
    for row in rows:
        row["wall_ratio_vs_eager"] = row["wall_per_epoch"][-1] / eager
        row["cpu_ratio_vs_eager"] = row["cpu_per_epoch"][-1] / eager_cpu
    return rows


SUITES = {"deep_quick": deep_quick, "deep_fmnist": deep_fmnist, "deep_compiled": deep_compiled}
DEFAULT = ["deep_quick"]

if __name__ == "__main__":
    import sys

    from benchmarks.experiment import format_table

    if sys.argv[1:] == ["deep_compiled"]:
        for r in deep_compiled(quick=False):
            print(r)
    else:
        print(format_table(deep_quick(quick=True)))
