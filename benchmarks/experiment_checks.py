"""Single-seed checks behind the README's reading of the full-data CPU run.

Each check trains one configuration on all of Fashion-MNIST with seed 0 at the tuned value
of the full run (no tuning) and prints its test accuracy 4 times an epoch::

    OMP_NUM_THREADS=1 python -m benchmarks.experiment_checks gauss_newton_armijo_b250 --epochs 8
    OMP_NUM_THREADS=1 python -m benchmarks.experiment_checks gauss_newton_armijo_b500 --width 32 --epochs 4
    OMP_NUM_THREADS=1 python -m benchmarks.experiment_checks adam --width 32 --epochs 4
    OMP_NUM_THREADS=1 python -m benchmarks.experiment_checks adam_cosine --value 1e-3 --epochs 10 \
        --seed S   (S = 0, 1, 2: Adam with the cosine at the constant-step run's learning rate)
    OMP_NUM_THREADS=1 python -m benchmarks.experiment_checks gauss_newton_armijo_b250_c250_cosine \
        --value 0.1 --epochs 10   (the GGN on the whole batch at the damping of the seed-0 lead;
        the full protocol tuned it to 0.01)

The figures are in ``benchmarks/results/deep_full_cpu10_checks.md``.
"""

from __future__ import annotations

import argparse

from benchmarks.data import load_dataset
from benchmarks.deep_methods import available_methods
from benchmarks.experiment import train

# The values the full runs' tuning chose (benchmarks/results/deep_full_cpu10.json and
# deep_full_cpu10_cosine.json); gauss_newton_armijo_b250 was not in those runs and uses the
# damping of the entry with the GGN on fewer examples.
TUNED = {"adam": 1e-3, "sgd": 0.01, "gauss_newton_armijo_b500": 0.1,
         "gauss_newton_armijo_b250": 0.1, "hessian_free_b250": 0.3,
         "adam_cosine": 3e-3, "sgd_cosine": 0.1, "gauss_newton_armijo_b250_cosine": 0.1,
         "hessian_free_b250_cosine": 0.3, "gauss_newton_armijo_b250_c250_cosine": 0.01}  # fmt: skip


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("method", choices=sorted(TUNED))
    parser.add_argument(
        "--value", type=float, help="the method's knob (default: the full run's tuned value)"
    )
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, help="default: all 60k")
    args = parser.parse_args(argv)
    data = load_dataset("fashion-mnist", train_size=args.train_size)
    method = available_methods()[args.method]
    value = TUNED[args.method] if args.value is None else args.value
    run = train(method, value, "resnet_s2", data.train_x, data.train_y,
                data.test_x, data.test_y, epochs=args.epochs, seed=args.seed,
                evals_per_epoch=4, width=args.width)  # fmt: skip
    per_epoch = run.seconds[-1] / run.epochs[-1] if run.epochs else float("nan")
    print(f"{args.method} {method.knob}={value:g} width {args.width} seed {args.seed}: "
          f"{per_epoch:.0f} s/epoch")  # fmt: skip
    print("test accuracy:", " ".join(f"{a:.3f}" for a in run.accuracy))
    print("averaged params:", " ".join(f"{a:.3f}" for a in run.averaged_accuracy))
    return run.accuracy


if __name__ == "__main__":
    main()
