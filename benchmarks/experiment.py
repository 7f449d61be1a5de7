"""Mini-batch second-order training against tuned SGD with momentum and Adam.

Each method gets the same tuning budget: a grid of three values of its main knob
(learning rate, damping or batch size), run with seed 0 on a validation split carved
from the training set; the value with the best final validation accuracy is then run
with ``--seeds`` seeds and reported on the test set: epochs and seconds of training
(evaluation excluded) until the test accuracy first reaches ``--target``, and the
final test accuracy (mean and spread over seeds). An epoch is one pass of the
*gradient* batches over the training set; curvature products on subsamples and line
search evaluations are extra work that shows in the wall-clock time, not the epochs.

Quick version (inside ``make bench``, via ``benchmarks/bench_deep.py``)::

    python -m benchmarks.experiment --quick

The full experiment (Fashion-MNIST, MLP and small ResNet, all methods, 3 seeds)::

    python -m benchmarks.experiment --full [--device cuda]

Plots and a JSON record go to ``benchmarks/results/``. The methods and their grids are in
:mod:`benchmarks.deep_methods`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.func as tf
from torch.nn.functional import cross_entropy

from benchmarks.data import Dataset, load_dataset
from benchmarks.deep_methods import Method, available_methods
from benchmarks.models import make_model
from soo_func import training
from soo_func.stochastic import batch_overlap, overlapping_batches

RESULTS = Path(__file__).parent / "results"


def functional_model(name: str, seed: int, device, width: int = 8):
    """``(apply_fn, loss_fn, params)`` for ``make_model(name)`` on ``device``."""
    module = make_model(name, seed=seed, width=width).to(device)
    params = {k: v.detach().clone() for k, v in module.named_parameters()}

    def apply_fn(p, inputs):
        return tf.functional_call(module, p, (inputs,))

    def loss_fn(p, batch):
        return cross_entropy(apply_fn(p, batch[0]), batch[1])

    return apply_fn, loss_fn, params


@torch.no_grad()
def accuracy(apply_fn, params, x, y, chunk: int = 2000) -> float:
    correct = 0
    for i in range(0, len(y), chunk):
        correct += (apply_fn(params, x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum().item()
    return correct / len(y)


def _batches(method: Method, knob: float, n: int, gen: torch.Generator, device):
    size = min(method.batch(knob), n)
    if method.overlap is not None:
        return overlapping_batches(n, size, min(method.overlap, size - 1), gen, device)
    order = torch.randperm(n, generator=gen).to(device)
    return (order[i : i + size] for i in range(0, n - size + 1, size))


@dataclass
class Run:
    method: str
    knob: float
    seed: int
    epochs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    diverged: bool = False

    def first_reaching(self, target: float) -> tuple[float, float]:
        for e, s, a in zip(self.epochs, self.seconds, self.accuracy, strict=True):
            if a >= target:
                return e, s
        return math.nan, math.nan


def train(
    method: Method,
    knob: float,
    model: str,
    train_x,
    train_y,
    eval_x,
    eval_y,
    *,
    epochs: float,
    seed: int,
    evals_per_epoch: int = 2,
    width: int = 8,
) -> Run:
    """Train ``model`` with ``method`` at ``knob``; evaluate ``evals_per_epoch`` times an epoch."""
    device = train_x.device
    torch.manual_seed(seed)
    apply_fn, loss_fn, params = functional_model(model, seed, device, width)
    gen = torch.Generator().manual_seed(seed)
    run = Run(method.name, knob, seed)
    n = len(train_y)
    if method.kind == "torch":
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        opt = method.build(knob)(list(params.values()))
    else:
        opt = method.build(knob)
        state = opt.init(params)
    seen, clock, next_eval = 0, 0.0, n / evals_per_epoch
    while seen < epochs * n and not run.diverged:
        for idx in _batches(method, knob, n, gen, device):
            start = time.perf_counter()
            batch = (train_x[idx], train_y[idx])
            if method.kind == "torch":
                opt.zero_grad()
                loss = loss_fn(params, batch)
                loss.backward()
                opt.step()
                loss = loss.detach()
            else:
                extra = {}
                if method.curvature_size and not method.ggn_residual:
                    extra["curvature"] = training.ggn_operator(
                        apply_fn,
                        cross_entropy,
                        params,
                        training.subsample(batch, method.curvature_size),
                    )
                if method.ggn_residual:
                    sub = training.subsample(batch, method.curvature_size or len(idx))
                    extra["residual_fn"] = training.cross_entropy_ggn_residual(
                        apply_fn, params, sub[0]
                    )
                if method.overlap:
                    overlap = batch_overlap(batch, min(method.overlap, len(idx) - 1))
                    extra["overlap_value_fn"] = training.bind_batch(loss_fn, overlap)
                params, state, loss = training.training_step(
                    opt, loss_fn, params, state, batch, **extra
                )
            loss = float(loss)
            clock += time.perf_counter() - start
            seen += len(idx) - (method.overlap or 0)
            if not math.isfinite(loss):
                run.diverged = True
                break
            if seen >= next_eval or seen >= epochs * n:
                run.epochs.append(seen / n)
                run.seconds.append(clock)
                run.accuracy.append(accuracy(apply_fn, params, eval_x, eval_y))
                run.loss.append(loss)
                next_eval += n / evals_per_epoch
            if seen >= epochs * n:
                break
    return run


def _spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.mean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def run_experiment(
    data: Dataset,
    *,
    models: list[str],
    methods: list[str],
    seeds: int,
    epochs: float,
    target: float,
    validation: int,
    width: int = 8,
    verbose: bool = True,
) -> tuple[list[dict], dict]:
    """Tune every method on a validation split, rerun the best over seeds, return table rows."""
    available = available_methods()
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(
            f"unknown or unavailable methods {unknown}; available: {sorted(available)}"
        )
    val_x, val_y = data.train_x[:validation], data.train_y[:validation]
    fit_x, fit_y = data.train_x[validation:], data.train_y[validation:]
    rows, curves = [], {}
    for model in models:
        for name in methods:
            method = available[name]
            tuning = {}
            for knob in method.grid:
                r = train(
                    method,
                    knob,
                    model,
                    fit_x,
                    fit_y,
                    val_x,
                    val_y,
                    epochs=epochs,
                    seed=0,
                    width=width,
                )
                tuning[knob] = -1.0 if r.diverged or not r.accuracy else r.accuracy[-1]
                if verbose:
                    print(
                        f"  tune {model} {name} {method.knob}={knob:g}: val acc {tuning[knob]:.4f}",
                        flush=True,
                    )
            best = max(tuning, key=tuning.get)
            runs = [
                train(
                    method,
                    best,
                    model,
                    data.train_x,
                    data.train_y,
                    data.test_x,
                    data.test_y,
                    epochs=epochs,
                    seed=s,
                    width=width,
                )
                for s in range(seeds)
            ]
            reach = [r.first_reaching(target) for r in runs]
            e_mean, e_std = _spread([e for e, _ in reach])
            t_mean, t_std = _spread([t for _, t in reach])
            a_mean, a_std = _spread([r.accuracy[-1] if r.accuracy else math.nan for r in runs])
            s_mean, _ = _spread(
                [r.seconds[-1] / r.epochs[-1] if r.epochs else math.nan for r in runs]
            )
            row = {
                "model": model,
                "method": name,
                "tuned": f"{method.knob}={best:g}",
                "reached": f"{sum(math.isfinite(e) for e, _ in reach)}/{seeds}",
                "epochs_to_target": e_mean,
                "epochs_sd": e_std,
                "seconds_to_target": t_mean,
                "seconds_sd": t_std,
                "final_test_acc": a_mean,
                "acc_sd": a_std,
                "sec_per_epoch": s_mean,
                "diverged": sum(r.diverged for r in runs),
            }
            rows.append(row)
            curves[f"{model}/{name}"] = [r.__dict__ for r in runs]
            if verbose:
                print(
                    "  ",
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                    flush=True,
                )
    return rows, curves


def plot(curves: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({k.split("/")[0] for k in curves})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for key, runs in curves.items():
            if not key.startswith(model + "/"):
                continue
            for i, r in enumerate(runs):
                label = key.split("/")[1] if i == 0 else None
                color = f"C{sorted(curves).index(key) % 10}"
                axes[row, 0].plot(r["epochs"], r["accuracy"], color=color, alpha=0.7, label=label)
                axes[row, 1].plot(r["seconds"], r["accuracy"], color=color, alpha=0.7, label=label)
        for col, xlabel in enumerate(("epochs", "training seconds")):
            ax = axes[row, col]
            ax.axhline(target, color="k", ls=":", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_title(model)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [
        [f"{r.get(k, ''):.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        for r in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


PRESETS = {
    "quick": {
        "dataset": "digits",
        "train_size": None,
        "test_size": None,
        "models": ["mlp"],
        "seeds": 2,
        "epochs": 2.0,
        "target": 0.8,
        "validation": 200,
    },
    "small": {
        "dataset": "fashion-mnist",
        "train_size": 10000,
        "test_size": 2000,
        "models": ["mlp", "resnet"],
        "seeds": 3,
        "epochs": 3.0,
        "target": 0.8,
        "validation": 1000,
    },
    "full": {
        "dataset": "fashion-mnist",
        "train_size": None,
        "test_size": None,
        "models": ["mlp", "resnet"],
        "seeds": 3,
        "epochs": 20.0,
        "target": 0.9,
        "validation": 5000,
    },
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="digits, MLP, 2 epochs (seconds)")
    size.add_argument("--small", action="store_true", help="10k Fashion-MNIST subset, 3 epochs")
    size.add_argument("--full", action="store_true", help="all of Fashion-MNIST, 20 epochs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: all available")
    parser.add_argument("--models", nargs="+", choices=["mlp", "resnet"])
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--target", type=float, help="test accuracy target (full: 0.9)")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--validation", type=int, help="training examples held out for tuning")
    parser.add_argument("--width", type=int, default=8, help="ResNet width")
    parser.add_argument("--tag", default=None, help="name of the outputs in benchmarks/results/")
    args = parser.parse_args(argv)
    preset_name = "full" if args.full else "small" if args.small else "quick"
    cfg = dict(PRESETS[preset_name])
    for key in ("models", "seeds", "epochs", "target", "train_size", "test_size", "validation"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    data = load_dataset(
        cfg["dataset"], train_size=cfg["train_size"], test_size=cfg["test_size"]
    ).to(device)
    methods = args.methods or list(available_methods())
    print(
        f"{preset_name}: {data.name} train {len(data.train_y)} test {len(data.test_y)} on {device}; "
        f"{cfg['models']} x {methods}; {cfg['seeds']} seeds, {cfg['epochs']} epochs, target {cfg['target']}"
    )
    rows, curves = run_experiment(
        data,
        models=cfg["models"],
        methods=methods,
        seeds=cfg["seeds"],
        epochs=cfg["epochs"],
        target=cfg["target"],
        validation=cfg["validation"],
        width=args.width,
    )
    print(format_table(rows))
    tag = args.tag or preset_name
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(curves, cfg["target"], RESULTS / f"deep_{tag}.png")
    with open(RESULTS / f"deep_{tag}.json", "w") as f:
        json.dump({"config": cfg, "device": str(device), "rows": rows, "curves": curves}, f)
    print(f"wrote {RESULTS / f'deep_{tag}.png'} and .json")
    return rows


if __name__ == "__main__":
    main()
