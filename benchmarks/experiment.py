"""Mini-batch second-order training against tuned SGD with momentum and Adam.

Each method gets the same tuning budget: a grid of three values of its main knob
(learning rate, damping or batch size), run with seed 0 on a validation split carved
from the training set (for ``--tune-epochs`` epochs, default ``--epochs``, on the first
``--tune-size`` of the remaining training examples, default all of them); the value
with the best final validation accuracy is then run with ``--seeds`` seeds on the whole
training set and reported on the test set: epochs and seconds of training (evaluation
excluded) until the test accuracy first reaches ``--target``, their ratios to tuned
Adam's in the same run (``epochs_ratio_vs_adam``, ``seconds_ratio_vs_adam``; < 1 is
fewer), and the final test accuracy (mean and spread over seeds). An epoch is one pass of the
*gradient* batches over the training set; curvature products on subsamples and line
search evaluations are extra work that shows in the wall-clock time, not the epochs.

Quick version (inside ``make bench``, via ``benchmarks/bench_deep.py``)::

    python -m benchmarks.experiment --quick

The full experiment (all of Fashion-MNIST, MLP and small ResNet, all methods, tuned for
20 epochs, 3 seeds of 20 epochs: GPU-scale, days on one CPU core)::

    python -m benchmarks.experiment --full --device cuda

The full-data run that fits this machine's CPU (the README's tables, 1-2 hours of two cores
each): the strided-stem ResNet, tuning shortened to one epoch on 20k examples, methods and
seeds split over two one-thread processes with ``--methods`` / ``--first-seed``, then merged.
Constant steps::

    OMP_NUM_THREADS=1 python -m benchmarks.experiment --full --models resnet_s2 --width 16 \
        --epochs 10 --tune-epochs 1 --tune-size 20000 --evals-per-epoch 4 \
        --methods adam sgd gauss_newton_armijo_b500 --tag full_cpu10_a
    (... --methods hessian_free_b250 --tag full_cpu10_b;
     ... --methods gauss_newton_armijo_b500 --seeds 3 --first-seed 3 --tag full_cpu10_c;
     ... --methods adam sgd --seeds 3 --first-seed 3 --tag full_cpu10_d)
    python -m benchmarks.experiment_report benchmarks/results/deep_full_cpu10_{a,b,c,d}.json \
        --save benchmarks/results/deep_full_cpu10.json --plot benchmarks/results/deep_full_cpu10.png

Every step decayed to 0 along a cosine over the run (the ``_cosine`` methods), each run also
evaluating a one-epoch moving average of its parameters (:class:`ParamsAverage`; the report's
``--averaged`` reads it)::

    ... --methods gauss_newton_armijo_b250_cosine --tag full_cpu10_e
    ... --methods adam_cosine sgd_cosine --seeds 6 --tag full_cpu10_f
    python -m benchmarks.experiment_report benchmarks/results/deep_full_cpu10_{e,f}.json \
        --peer adam_cosine [--averaged] --save benchmarks/results/deep_full_cpu10_cosine.json

(the README lists all seven commands of that table: Hessian-free and more seeds were added
as ``full_cpu10_{g,h,i}``, Gauss-Newton with the GGN on the whole batch as ``full_cpu10_{j,k}``).

Plots and a JSON record go to ``benchmarks/results/``. The methods and their grids are in
:mod:`benchmarks.deep_methods`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.func as tf
from torch.nn.functional import cross_entropy

import soo_func as sf
import soo_func.stochastic.training as training
from benchmarks.data import Dataset, load_dataset
from benchmarks.deep_methods import Method, available_methods
from benchmarks.experiment_report import (
    first_reaching,
    format_table,
    plot,
    summarize_runs,
    with_ratios,
)
from benchmarks.models import MODELS, make_model
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


def _num_updates(method: Method, knob: float, n: int, epochs: float) -> int:
    """The updates :func:`train` makes in ``epochs`` (the horizon of a decaying step)."""
    size = min(method.batch(knob), n)
    return max(1, math.ceil(epochs * n / (size - (method.overlap or 0))))


@dataclass
class Run:
    method: str
    knob: float
    seed: int
    epochs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    averaged_accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    diverged: bool = False

    def first_reaching(self, target: float) -> tuple[float, float]:
        return first_reaching(self.epochs, self.seconds, self.accuracy, target)


class ParamsAverage:
    """Exponential moving average of the parameters with a time constant of one epoch.

    After each update of ``batch`` examples out of ``n``, with ``decay = 1 - batch / n``:
    ``sum <- decay sum + (1 - decay) params`` and ``weight <- decay weight + (1 - decay)``;
    the average is ``sum / weight`` (started from zero and debiased by the weight, as
    Adam's moments, so the first epochs are not pulled towards the initial parameters).
    Iterate averaging (Polyak & Juditsky 1992) removes the step-to-step noise of a
    stochastic method's iterates; the experiment evaluates it alongside the iterate itself.
    """

    def __init__(self, params: dict[str, torch.Tensor]):
        self.sum = {k: torch.zeros_like(v) for k, v in params.items()}
        self.weight = 0.0

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], fraction: float) -> None:
        decay = 1.0 - min(fraction, 1.0)
        for k, v in params.items():
            self.sum[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
        self.weight = decay * self.weight + (1.0 - decay)

    def value(self) -> dict[str, torch.Tensor]:
        return {k: v / self.weight for k, v in self.sum.items()}


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
    track_average: bool = True,
) -> Run:
    """Train ``model`` with ``method`` at ``knob``; evaluate ``evals_per_epoch`` times an epoch.

    With ``track_average`` the one-epoch average of the parameters (:class:`ParamsAverage`) is
    evaluated alongside the iterate at every evaluation point; tuning, which reads only the
    iterate, turns it off.
    """
    device = train_x.device
    torch.manual_seed(seed)
    apply_fn, loss_fn, params = functional_model(model, seed, device, width)
    gen = torch.Generator().manual_seed(seed)
    run = Run(method.name, knob, seed)
    n = len(train_y)
    decay = None
    if method.cosine_decay:
        decay = sf.cosine_decay_schedule(1.0, _num_updates(method, knob, n, epochs))
    scheduler = None
    if method.kind == "torch":
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        opt = method.build(knob)(list(params.values()))
        if decay is not None:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda count: float(decay(torch.tensor(count)))
            )
    else:
        opt = (
            method.build(knob) if decay is None else method.build(knob, sf.scale_by_schedule(decay))
        )
        state = opt.init(params)
    # not timed: part of the evaluation, like the test passes
    average = ParamsAverage(params) if track_average else None
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
                if scheduler is not None:
                    scheduler.step()
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
            if average is not None:
                average.update(params, (len(idx) - (method.overlap or 0)) / n)
            if seen >= next_eval or seen >= epochs * n:
                run.epochs.append(seen / n)
                run.seconds.append(clock)
                run.accuracy.append(accuracy(apply_fn, params, eval_x, eval_y))
                if average is not None:
                    run.averaged_accuracy.append(
                        accuracy(apply_fn, average.value(), eval_x, eval_y)
                    )
                run.loss.append(loss)
                next_eval += n / evals_per_epoch
            if seen >= epochs * n:
                break
    return run


def run_experiment(
    data: Dataset,
    *,
    models: list[str],
    methods: list[str],
    seeds: int,
    first_seed: int = 0,
    epochs: float,
    target: float,
    validation: int,
    width: int = 8,
    tune_epochs: float | None = None,
    tune_size: int | None = None,
    evals_per_epoch: int = 2,
    on_row: Callable[[list[dict], dict], None] | None = None,
    verbose: bool = True,
) -> tuple[list[dict], dict]:
    """Tune every method on a validation split, rerun the best over seeds, return table rows.

    Tuning runs ``tune_epochs`` (default ``epochs``) on ``tune_size`` examples (default all
    but the ``validation`` held out), the same budget for every method. ``on_row(rows,
    curves)`` is called after each seed of each method, the current method's row computed
    from its seeds so far (e.g. to save partial results: a long run cut off loses at most
    the seed in progress).
    """
    available = available_methods()
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(
            f"unknown or unavailable methods {unknown}; available: {sorted(available)}"
        )
    if not 0 < validation < len(data.train_y):
        raise ValueError(
            f"validation={validation} must be between 1 and the training size - 1 "
            f"({len(data.train_y) - 1})"
        )
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1 (the runs reported per method), got {seeds}")
    if tune_size is not None and tune_size < 1:
        raise ValueError(f"tune_size must be a positive number of examples, got {tune_size}")
    if tune_epochs is not None and tune_epochs <= 0:
        raise ValueError(f"tune_epochs must be positive, got {tune_epochs}")
    tune_epochs = epochs if tune_epochs is None else tune_epochs
    val_x, val_y = data.train_x[:validation], data.train_y[:validation]
    end = None if tune_size is None else validation + tune_size
    fit_x, fit_y = data.train_x[validation:end], data.train_y[validation:end]
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
                    epochs=tune_epochs,
                    seed=0,
                    width=width,
                    evals_per_epoch=evals_per_epoch,
                    track_average=False,
                )
                tuning[knob] = -1.0 if r.diverged or not r.accuracy else r.accuracy[-1]
                if verbose:
                    print(
                        f"  tune {model} {name} {method.knob}={knob:g}: val acc {tuning[knob]:.4f}",
                        flush=True,
                    )
            best = max(tuning, key=tuning.get)
            key, runs = f"{model}/{name}", []
            for seed in range(first_seed, first_seed + seeds):
                run = train(
                    method,
                    best,
                    model,
                    data.train_x,
                    data.train_y,
                    data.test_x,
                    data.test_y,
                    epochs=epochs,
                    seed=seed,
                    width=width,
                    evals_per_epoch=evals_per_epoch,
                )
                runs.append(run)
                records = [r.__dict__ for r in runs]
                row = {
                    "model": model,
                    "method": name,
                    "tuned": f"{method.knob}={best:g}",
                    **summarize_runs(records, target),
                }
                if on_row is not None:
                    on_row(with_ratios([*rows, row]), {**curves, key: records})
                if verbose:
                    reached_at, _ = run.first_reaching(target)
                    averaged_at, _ = first_reaching(
                        run.epochs, run.seconds, run.averaged_accuracy, target
                    )
                    print(
                        f"    seed {seed}: test acc {max(run.accuracy, default=math.nan):.4f} best, "
                        f"{run.accuracy[-1] if run.accuracy else math.nan:.4f} final; "
                        f"{target:g} first at epoch {reached_at:.2f} "
                        f"(averaged params: {averaged_at:.2f})",
                        flush=True,
                    )
            rows.append(row)
            curves[key] = records
            with_ratios(rows)
            if verbose:
                print(
                    "  ",
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                    flush=True,
                )
    return rows, curves


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
    size.add_argument(
        "--full",
        action="store_true",
        help="all of Fashion-MNIST, MLP and ResNet, all methods, 3 seeds, 20 epochs "
        "(GPU-scale: use --device cuda; see above for the run that fits one CPU core)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: all available")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, help="resnet_s2: ResNet with a stride-2 stem"
    )
    parser.add_argument("--seeds", type=int)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first_seed, ..., first_seed + seeds - 1 "
        "(to split seeds across processes; merge with benchmarks.experiment_report)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--target", type=float, help="test accuracy target (full: 0.9)")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--validation", type=int, help="training examples held out for tuning")
    parser.add_argument("--width", type=int, default=8, help="ResNet width")
    parser.add_argument(
        "--tune-epochs", type=float, help="epochs of each tuning run (default --epochs)"
    )
    parser.add_argument(
        "--tune-size", type=int, help="training examples of each tuning run (default all)"
    )
    parser.add_argument(
        "--evals-per-epoch", type=int, default=2, help="test evaluations per epoch (default 2)"
    )
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
    tag = args.tag or preset_name
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = {
        **cfg,
        "methods": methods,
        "width": args.width,
        "tune_epochs": args.tune_epochs,
        "tune_size": args.tune_size,
        "evals_per_epoch": args.evals_per_epoch,
        "threads": torch.get_num_threads(),
        "first_seed": args.first_seed,
    }

    def save(rows: list[dict], curves: dict, suffix: str = "") -> Path:
        path = RESULTS / f"deep_{tag}{suffix}.json"
        with open(path, "w") as f:
            json.dump({"config": config, "device": str(device), "rows": rows, "curves": curves}, f)
        return path

    rows, curves = run_experiment(
        data,
        models=cfg["models"],
        methods=methods,
        seeds=cfg["seeds"],
        first_seed=args.first_seed,
        epochs=cfg["epochs"],
        target=cfg["target"],
        validation=cfg["validation"],
        width=args.width,
        tune_epochs=args.tune_epochs,
        tune_size=args.tune_size,
        evals_per_epoch=args.evals_per_epoch,
        on_row=lambda rows, curves: save(rows, curves, "_partial"),
    )
    print(format_table(rows))
    plot(curves, cfg["target"], RESULTS / f"deep_{tag}.png")
    save(rows, curves)
    print(f"wrote {RESULTS / f'deep_{tag}.png'} and .json")
    return rows


if __name__ == "__main__":
    main()
