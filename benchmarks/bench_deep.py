"""Deep-learning suites: a short version of :mod:`benchmarks.experiment`.

``deep_quick`` (in the default bundle, well under a minute on 2 cores): the MLP on
scikit-learn's digits (always available; upsampled to 28x28), SGD with momentum and
Adam from ``torch.optim`` against Hessian-free (subsampled GGN) and multi-batch
L-BFGS, each tuned over its 3-value grid, then rerun over seeds. Ratios are against
tuned Adam measured in the same run (``< 1`` means fewer epochs / less time).

``deep_fmnist``: the same on a 10k subset of Fashion-MNIST with the small ResNet
(minutes; needs the ``dataset-fashion-mnist`` package, digits otherwise).
"""

from __future__ import annotations

import torch

from benchmarks.data import load_dataset
from benchmarks.experiment import available_methods, run_experiment
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


SUITES = {"deep_quick": deep_quick, "deep_fmnist": deep_fmnist}
DEFAULT = ["deep_quick"]

if __name__ == "__main__":
    from benchmarks.experiment import format_table

    print(format_table(deep_quick(quick=True)))
