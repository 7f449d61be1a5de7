"""Every optimizer family trains the tiny GroupNorm ResNet for one epoch without NaN.

Small data (256 examples of the digits, batch 64, 4 steps), each family with its
defaults, chained with a search where it needs one, in the mini-batch setting of
:mod:`soo_func.stochastic.training`: the loss bound to the batch as ``value_fn``, the
Gauss-Newton curvature on a 16-example subsample (for ``gauss_newton`` through the
residual factor :func:`soo_func.stochastic.training.cross_entropy_ggn_residual`). The checks:
losses and params stay finite; every family with a monotone search (Armijo, Wolfe, a trust
region, Levenberg) never raises the loss of the batch it searched on (the search's own
guarantee, deterministic); and the loss on all 256 examples goes down after the epoch, except
for Gauss-Newton + Armijo (see ``FULL_DATA_UNGUARANTEED``). The families that run a Krylov
solve of up to 100 products per step are marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import cross_entropy

import soo_func as sf
import soo_func.directions as directions
import soo_func.searches as searches
import soo_func.stochastic.training as training
from benchmarks.data import load_dataset
from benchmarks.experiment import functional_model
from benchmarks.models import SmallResNet
from soo_func.stochastic import batch_overlap, hessian_free, multi_batch_lbfgs

BATCH, CURVATURE, OVERLAP = 64, 16, 16


def family(name):
    for where in (sf, directions, searches):
        if hasattr(where, name):
            return getattr(where, name)
    pytest.skip(f"soo_func has no {name} yet")


CONFIGS = {
    "lbfgs+armijo": lambda: sf.chain(family("lbfgs")(), family("armijo")()),
    "lbfgs+wolfe": lambda: sf.chain(family("lbfgs")(), family("wolfe")()),
    "bfgs+wolfe": lambda: sf.chain(family("bfgs")(), family("wolfe")()),
    "nonlinear_cg+wolfe": lambda: sf.chain(family("nonlinear_cg")(), family("wolfe")()),
    "newton_krylov+armijo": lambda: sf.chain(family("newton_krylov")(), family("armijo")()),
    "newton_krylov+trust_region": lambda: sf.chain(
        family("newton_krylov")(), family("trust_region")()
    ),
    "gauss_newton+armijo": lambda: sf.chain(family("gauss_newton")(), family("armijo")()),
    "gauss_newton+trust_region": lambda: sf.chain(
        family("gauss_newton")(), family("trust_region")()
    ),
    "levenberg": lambda: family("levenberg")(),
    "hessian_free": hessian_free,
    "multi_batch_lbfgs": lambda: multi_batch_lbfgs(learning_rate=0.1),
}


@pytest.fixture(scope="module")
def data():
    d = load_dataset("digits", seed=0)
    return d.train_x[:256], d.train_y[:256]


def _extras(name, apply_fn, loss_fn, params, batch):
    extra = {}
    if name in ("hessian_free", "levenberg"):
        sub = training.subsample(batch, CURVATURE)
        extra["curvature"] = training.ggn_operator(apply_fn, cross_entropy, params, sub)
    if name.startswith("gauss_newton"):
        sub = training.subsample(batch, CURVATURE)
        extra["residual_fn"] = training.cross_entropy_ggn_residual(apply_fn, params, sub[0])
    if name == "multi_batch_lbfgs":
        extra["overlap_value_fn"] = training.bind_batch(loss_fn, batch_overlap(batch, OVERLAP))
    return extra


# Krylov solves of up to 100 Hessian/GGN products per step: about 20-60 s each on 2 cores.
SLOW = {"newton_krylov+armijo", "newton_krylov+trust_region", "gauss_newton+armijo",
        "gauss_newton+trust_region", "levenberg"}  # fmt: skip


# Gauss-Newton + Armijo with its defaults (undamped, a 16-sample GGN) takes the full
# Gauss-Newton step on each 64-sample batch whenever the batch loss falls enough: it fits each
# batch (every batch loss falls, asserted below), and whether the loss on all 256 samples is
# lower after four such steps is not a property of the method. It flips with the rounding of
# the BLAS: 2.41 -> 2.61 with two threads, lower with one (issue 16). Nothing asserts it.
FULL_DATA_UNGUARANTEED = {"gauss_newton+armijo"}


MONOTONE = {name for name in CONFIGS if name not in ("hessian_free", "multi_batch_lbfgs")}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in CONFIGS]
)
def test_family_trains_tiny_resnet_one_epoch(name, data, monkeypatch):
    x, y = data
    monkeypatch.setattr(
        "benchmarks.experiment.make_model", lambda *a, **k: _tiny_resnet(k.get("seed", 0))
    )
    apply_fn, loss_fn, params = functional_model("resnet", seed=0, device=x.device)
    opt = CONFIGS[name]()
    state = opt.init(params)
    initial = float(loss_fn(params, (x, y)))
    stride = BATCH - OVERLAP if name == "multi_batch_lbfgs" else BATCH
    losses = []
    for start in range(0, len(y) - BATCH + 1, stride):
        batch = (x[start : start + BATCH], y[start : start + BATCH])
        extra = _extras(name, apply_fn, loss_fn, params, batch)
        params, state, loss = training.training_step(opt, loss_fn, params, state, batch, **extra)
        losses.append(float(loss))
        if name in MONOTONE:
            after = float(loss_fn(params, batch))
            assert after <= float(loss) * (1 + 1e-12), (name, start, float(loss), after)
    final = float(loss_fn(params, (x, y)))
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in params.values())
    if name not in FULL_DATA_UNGUARANTEED:
        assert final < initial, (name, initial, final, losses)


def _tiny_resnet(seed):
    torch.manual_seed(seed)
    return SmallResNet(1, 10, width=2)


@pytest.mark.slow
def test_levenberg_marquardt_one_step_on_tiny_resnet(data, monkeypatch):
    """levenberg_marquardt's damping diagonal D = diag(J^T J) needs the dense Jacobian (n
    products per step), so on a network it is only affordable tiny: one batch of 64 (one epoch), the
    residual factor on 8 examples. A step is either accepted with a lower loss or
    rejected with the params unchanged; nothing becomes NaN."""
    x, y = data[0][:64], data[1][:64]
    monkeypatch.setattr(
        "benchmarks.experiment.make_model", lambda *a, **k: _tiny_resnet(k.get("seed", 0))
    )
    apply_fn, loss_fn, params = functional_model("resnet", seed=0, device=x.device)
    opt = family("levenberg_marquardt")()
    batch = (x, y)
    sub = training.subsample(batch, 8)
    extra = {
        "curvature": training.ggn_operator(apply_fn, cross_entropy, params, sub),
        "residual_fn": training.cross_entropy_ggn_residual(apply_fn, params, sub[0]),
    }
    new_params, _, loss = training.training_step(
        opt, loss_fn, params, opt.init(params), batch, **extra
    )
    new_loss = loss_fn(new_params, batch)
    assert torch.isfinite(loss) and torch.isfinite(new_loss)
    assert all(torch.isfinite(p).all() for p in new_params.values())
    assert new_loss <= loss


def test_read_idx_round_trip(tmp_path):
    import gzip
    import struct

    import numpy as np

    from benchmarks.data import read_idx

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + images.tobytes()
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="shape"):
        read_idx(tmp_path / "short")


def test_load_dataset_falls_back_to_digits_with_a_message(tmp_path):
    with pytest.warns(UserWarning, match="dataset-fashion-mnist"):
        data = load_dataset("fashion-mnist", directory=tmp_path, train_size=100)
    assert data.name == "digits" and data.train_x.shape == (100, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar")


def test_fashion_mnist_when_installed():
    from benchmarks.data import fashion_mnist_available, load_fashion_mnist

    if not fashion_mnist_available():
        pytest.skip("dataset-fashion-mnist is not installed")
    data = load_fashion_mnist()
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_y.min() == 0 and data.train_y.max() == 9
    assert abs(float(data.train_x.mean())) < 1e-2 and abs(float(data.train_x.std()) - 1) < 1e-2
    assert torch.bincount(data.test_y).tolist() == [1000] * 10


def test_experiment_harness_torch_and_functional_paths_agree(data):
    """The harness gives torch.optim and soo_func the same batches: torch.optim.SGD with
    momentum and sf.sgd with momentum (the same formula) give the same accuracy curve."""
    from benchmarks.experiment import Method, train

    x, y = data
    torch_sgd = Method(
        "sgd",
        "torch",
        "lr",
        (0.05,),
        lambda lr: lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    )
    functional_sgd = Method("sf_sgd", "soo", "lr", (0.05,), lambda lr: sf.sgd(lr, momentum=0.9))
    runs = [
        train(m, 0.05, "mlp", x, y, x[:64], y[:64], epochs=2.0, seed=3)
        for m in (torch_sgd, functional_sgd)
    ]
    assert runs[0].epochs == runs[1].epochs == [0.5, 1.0, 1.5, 2.0]
    assert runs[0].accuracy == runs[1].accuracy
    torch.testing.assert_close(torch.tensor(runs[0].loss), torch.tensor(runs[1].loss))
    assert runs[0].first_reaching(0.0) == (0.5, runs[0].seconds[0])
    assert all(map(math.isnan, runs[0].first_reaching(1.01)))
