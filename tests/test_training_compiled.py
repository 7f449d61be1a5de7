"""Compiled training steps and the one-forward Gauss-Newton product.

* :func:`~soo_func.stochastic.training.make_training_step` with ``compile=True`` gives the
  eager steps (params and losses over several batches, to rounding) for Gauss-Newton with
  the sync-free Armijo search, Hessian-free on a subsampled GGN and L-BFGS with the
  sync-free search, compiled once (``dynamic=False``, ``fullgraph=True``) and reused
  across batches of one shape with no recompile; a batch of another size recompiles it.
* The GGN product runs the model's forward once per operator, however many products
  (counted by a counter in the model), and equals ``J^T H_L J v`` with ``J`` from
  ``torch.func.jacrev`` (float64, 1e-10).

The compile cases use dynamo's ``eager`` backend (full-graph capture and guards, without
AOT tracing or inductor's code generation, which cost minutes per chain on one loaded
core) and are marked ``slow``; ``SOO_FUNC_FULL_COMPILE=1`` uses ``aot_eager``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.functional import cross_entropy

import soo_func as sf
import soo_func.stochastic.training as training
from soo_func.stochastic import hessian_free

D = torch.float64
BACKEND = "aot_eager" if os.environ.get("SOO_FUNC_FULL_COMPILE") == "1" else "eager"
NUM_BATCHES, BATCH, SUB = 4, 24, 8


class Counted:
    """A small MLP ``tanh(x W1^T + b1) W2^T`` whose forward calls are counted."""

    def __init__(self) -> None:
        self.calls = 0
        self.sizes: list[int] = []

    def __call__(self, p: dict, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.sizes.append(inputs.shape[0])
        return torch.tanh(inputs @ p["w1"].T + p["b1"]) @ p["w2"].T


def mlp(p: dict, inputs: torch.Tensor) -> torch.Tensor:
    """The same MLP, uncounted: a compiled step may not mutate Python state inside
    ``torch.cond`` (the sync-free search's branches)."""
    return torch.tanh(inputs @ p["w1"].T + p["b1"]) @ p["w2"].T


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(5, 4, generator=gen, dtype=D) * 0.5,
        "b1": torch.randn(5, generator=gen, dtype=D) * 0.1,
        "w2": torch.randn(3, 5, generator=gen, dtype=D) * 0.5,
    }
    xs = torch.randn(NUM_BATCHES, BATCH, 4, generator=gen, dtype=D)
    ys = torch.randint(0, 3, (NUM_BATCHES, BATCH), generator=gen)
    return params, [(xs[i], ys[i]) for i in range(NUM_BATCHES)]


def chains(apply_fn):
    """name -> (optimizer factory, extras_fn) for the three chains of the issue."""

    def residual_extra(p, batch):
        sub = training.subsample(batch, SUB)[0]
        return {"residual_fn": training.cross_entropy_ggn_residual(apply_fn, p, sub)}

    def curvature_extra(p, batch):
        sub = training.subsample(batch, SUB)
        return {"curvature": training.ggn_operator(apply_fn, cross_entropy, p, sub)}

    return {
        "gauss_newton+armijo_sync_free": (
            lambda: sf.chain(sf.gauss_newton(damping=0.1, max_iters=5), sf.armijo_sync_free()),
            residual_extra,
        ),
        "hessian_free(ggn)": (lambda: hessian_free(damping=0.3, max_cg_iters=5), curvature_extra),
        "lbfgs+armijo_sync_free": (
            lambda: sf.chain(sf.lbfgs(memory_size=3), sf.armijo_sync_free()),
            None,
        ),
    }


def train(step_of, params, batches, make):
    optimizer = make()
    step = step_of(optimizer)
    state, out = optimizer.init(params), []
    for batch in batches:
        params, state, loss = step(params, state, batch)
        out.append((params, loss))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gauss_newton+armijo_sync_free", "hessian_free(ggn)",
                                  "lbfgs+armijo_sync_free"])  # fmt: skip
def test_compiled_step_matches_eager_and_compiles_once(name):
    params, batches = problem()

    def loss_fn(p, batch):
        return cross_entropy(mlp(p, batch[0]), batch[1])

    make, extras_fn = chains(mlp)[name]
    eager = train(
        lambda opt: training.make_training_step(opt, loss_fn, extras_fn), params, batches, make
    )
    torch._dynamo.reset()
    counters.clear()
    compiled_fn = {}

    def compiled_step(opt):
        compiled_fn["step"] = training.make_training_step(
            opt, loss_fn, extras_fn, compile=True, backend=BACKEND
        )
        return compiled_fn["step"]

    traced = train(compiled_step, params, batches, make)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every batch
    assert not counters["recompiles"]
    assert not counters["graph_break"]
    for (p_eager, loss_eager), (p_traced, loss_traced) in zip(eager, traced, strict=True):
        torch.testing.assert_close(loss_traced, loss_eager, rtol=1e-12, atol=1e-12)
        for key in p_eager:
            torch.testing.assert_close(p_traced[key], p_eager[key], rtol=1e-11, atol=1e-12)
    # dynamic=False: a batch of another size compiles a second graph.
    optimizer = make()
    short = tuple(t[: BATCH - 2] for t in batches[0])
    compiled_fn["step"](params, optimizer.init(params), short)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_eager_step_is_training_step_with_its_extras():
    params, batches = problem()
    model = Counted()

    def loss_fn(p, batch):
        return cross_entropy(model(p, batch[0]), batch[1])

    make, extras_fn = chains(model)["gauss_newton+armijo_sync_free"]
    optimizer = make()
    state = optimizer.init(params)
    step = training.make_training_step(optimizer, loss_fn, extras_fn)
    got = step(params, state, batches[0])
    want = training.training_step(
        optimizer, loss_fn, params, state, batches[0], **extras_fn(params, batches[0])
    )
    for key in params:
        assert torch.equal(got[0][key], want[0][key])
    assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("cg_iters", [1, 5, 10])
def test_a_gauss_newton_step_runs_the_curvature_forward_once(cg_iters):
    """Forwards on the curvature subsample in one Gauss-Newton step: one (the residual's
    linearization), whatever the number of CG products (it was ``2 + cg_iters``: a forward
    for the factor, one for the linearization and one per ``jvp``)."""
    params, batches = problem()
    model = Counted()

    def loss_fn(p, batch):
        return cross_entropy(model(p, batch[0]), batch[1])

    _, extras_fn = chains(model)["gauss_newton+armijo_sync_free"]
    optimizer = sf.chain(sf.gauss_newton(damping=0.1, max_iters=cg_iters, rtol=1e-12), sf.armijo())
    step = training.make_training_step(optimizer, loss_fn, extras_fn)
    _, state, _ = step(params, optimizer.init(params), batches[0])
    assert int(state.states[0].num_products) == cg_iters
    assert model.sizes.count(SUB) == 1
    # the batch forwards: the value and gradient, then the search's trials
    search = state.states[1]
    assert model.sizes.count(BATCH) == 1 + int(search.num_search_evals)


@pytest.mark.parametrize("num_products", [1, 4])
def test_the_ggn_operator_runs_the_model_forward_once(num_products):
    params, batches = problem()
    model = Counted()
    operator = training.ggn_operator(model, cross_entropy, params, batches[0])
    v = {k: torch.ones_like(t) for k, t in params.items()}
    for _ in range(num_products):
        operator(v)
    assert model.calls == 1


def dense_ggn(apply_fn, params, inputs):
    """``J^T H_L J`` of the mean cross-entropy, ``J`` from ``jacrev``, ``H_L`` per example
    ``(diag(p) - p p^T) / n``."""
    raveled = sf.tree.ravel(params)

    def logits_of(flat):
        return apply_fn(sf.tree.unravel(flat, raveled), inputs)

    jac = torch.func.jacrev(lambda f: logits_of(f).reshape(-1))(raveled.flat)
    probs = torch.softmax(logits_of(raveled.flat), dim=1)
    blocks = (torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)) / len(inputs)
    return jac.T @ torch.block_diag(*blocks) @ jac, raveled


def test_ggn_products_match_dense_jt_hl_j():
    params, batches = problem(seed=3)
    model = Counted()
    x, _ = batches[0]
    dense, raveled = dense_ggn(model, params, x)
    gen = torch.Generator().manual_seed(1)
    operator = training.ggn_operator(model, cross_entropy, params, batches[0])
    residual_fn = training.cross_entropy_ggn_residual(model, params, x)
    _, factor_operator = sf.oracles.ggn_operator(residual_fn, params)
    for _ in range(3):
        v_flat = torch.randn(raveled.flat.shape, generator=gen, dtype=D)
        v = sf.tree.unravel(v_flat, raveled)
        want = dense @ v_flat
        for product in (operator, factor_operator):
            got = sf.tree.ravel(product(v)).flat
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
