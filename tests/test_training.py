"""Mini-batch helpers and stochastic methods against dense references."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_update_is_pure
from torch.nn.functional import cross_entropy

import soo_func as sf
import soo_func.stochastic.training as training
from soo_func.stochastic import (
    batch_overlap,
    hessian_free,
    multi_batch_lbfgs,
    overlapping_batches,
)
from soo_func.stochastic.hessian_free import _backtrack_schedule


def _mlp_problem(dtype, device, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(5, 4, generator=gen, dtype=dtype) * 0.5,
        "b1": torch.randn(5, generator=gen, dtype=dtype) * 0.1,
        "w2": torch.randn(3, 5, generator=gen, dtype=dtype) * 0.5,
    }
    params = {k: v.to(device) for k, v in params.items()}
    x = torch.randn(n, 4, generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, 3, (n,), generator=gen).to(device)

    def apply_fn(p, inputs):
        return torch.tanh(inputs @ p["w1"].T + p["b1"]) @ p["w2"].T

    def loss_fn(p, batch):
        return cross_entropy(apply_fn(p, batch[0]), batch[1])

    return params, (x, y), apply_fn, loss_fn


def _dense(params):
    raveled = sf.tree.ravel(params)
    return raveled.flat, lambda flat: sf.tree.unravel(flat, raveled)


def test_bind_batch_and_training_step(dtype, device):
    params, batch, _, loss_fn = _mlp_problem(dtype, device)
    value_fn = training.bind_batch(loss_fn, batch)
    assert torch.equal(value_fn(params), loss_fn(params, batch))
    new_params, _, value = training.training_step(
        sf.sgd(0.1), loss_fn, params, sf.sgd(0.1).init(params), batch
    )
    _, grad = sf.value_and_grad(value_fn)(params)
    for k in params:
        torch.testing.assert_close(new_params[k], params[k] - 0.1 * grad[k])
        assert new_params[k].device == params[k].device and new_params[k].dtype == dtype
    assert torch.equal(value, value_fn(params))


def test_subsample_takes_leading_examples():
    batch = (torch.arange(10.0), torch.arange(10))
    assert torch.equal(training.subsample(batch, 4)[1], torch.arange(4))
    assert torch.equal(training.subsample(batch, 0.5)[0], torch.arange(5.0))
    with pytest.raises(ValueError, match="fraction"):
        training.subsample(batch, 1.5)
    with pytest.raises(ValueError, match="leading"):
        training.subsample((torch.zeros(3), torch.zeros(4)), 2)


def test_subsampled_ggn_equals_dense_formula_on_the_subsample(dtype, device):
    """G v = J^T H_L J v with J from jacrev and H_L = (diag(p) - p p^T)/n per example,
    all on the subsample only (Byrd et al. 2011 curvature on a subset)."""
    params, batch, apply_fn, _ = _mlp_problem(dtype, device)
    sub = training.subsample(batch, 7)
    op = training.ggn_operator(apply_fn, cross_entropy, params, sub)
    flat, unravel = _dense(params)
    jac = torch.func.jacrev(lambda f: apply_fn(unravel(f), sub[0]).reshape(-1))(flat)
    probs = torch.softmax(apply_fn(params, sub[0]), dim=1)
    blocks = [torch.diag(p) - torch.outer(p, p) for p in probs]
    h_out = torch.block_diag(*blocks) / 7
    dense = jac.T @ h_out @ jac
    v = torch.randn(flat.numel(), dtype=dtype, generator=torch.Generator().manual_seed(1))
    v = v.to(device)
    got = sf.tree.ravel(op(unravel(v))).flat
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(got, dense @ v, **tol)
    # It is not the GGN of the whole batch (the subsample matters).
    whole = training.ggn_operator(apply_fn, cross_entropy, params, batch)
    assert not torch.allclose(sf.tree.ravel(whole(unravel(v))).flat, got, rtol=1e-3)


def test_cross_entropy_ggn_residual_factors_the_ggn(dtype, device):
    """J_r^T J_r of the residual factor equals the cross-entropy GGN (A^T A = diag(p) - p p^T)."""
    params, batch, apply_fn, _ = _mlp_problem(dtype, device)
    residual_fn = training.cross_entropy_ggn_residual(apply_fn, params, batch[0])
    ggn = training.ggn_operator(apply_fn, cross_entropy, params, batch)
    v = sf.tree.map_leaves(
        lambda t: torch.cos(torch.arange(t.numel(), dtype=dtype, device=device)).reshape(t.shape),
        params,
    )
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(
        sf.tree.ravel(sf.ggn_vp(residual_fn, params, v)).flat, sf.tree.ravel(ggn(v)).flat, **tol
    )


def test_subsampled_hessian_equals_dense_hessian(dtype, device):
    params, batch, _, loss_fn = _mlp_problem(dtype, device)
    sub = training.subsample(batch, 5)
    flat, unravel = _dense(params)
    dense = torch.func.hessian(lambda f: loss_fn(unravel(f), sub))(flat)
    v = torch.linspace(-1, 1, flat.numel(), dtype=dtype, device=device)
    got = sf.tree.ravel(training.hessian_operator(loss_fn, params, sub)(unravel(v))).flat
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got, dense @ v, **tol)


def test_overlapping_batches_share_exactly_the_overlap():
    batches = list(overlapping_batches(50, 10, 3, torch.Generator().manual_seed(0)))
    assert len(batches) == 6
    for a, b in itertools.pairwise(batches):
        assert torch.equal(a[-3:], b[:3])
        assert set(a.tolist()) & set(b.tolist()) == set(a[-3:].tolist())
    with pytest.raises(ValueError, match="overlap"):
        next(overlapping_batches(50, 10, 10))


def test_multi_batch_pairs_use_the_overlap_only(device):
    dtype = torch.float64
    params, batch, _, loss_fn = _mlp_problem(dtype, device, n=12)
    overlap = batch_overlap(batch, 4)
    opt = multi_batch_lbfgs(memory_size=3, learning_rate=0.5)
    state = opt.init(params)
    value_fn = training.bind_batch(loss_fn, batch)
    _, grad = sf.value_and_grad(value_fn)(params)
    overlap_fn = training.bind_batch(loss_fn, overlap)
    step, new_state = opt.update(grad, state, params, overlap_value_fn=overlap_fn)
    # First step: H_0 = I, so the step is -lr * g (of the whole batch).
    torch.testing.assert_close(sf.tree.ravel(step).flat, -0.5 * sf.tree.ravel(grad).flat)
    _, g0 = sf.value_and_grad(overlap_fn)(params)
    _, g1 = sf.value_and_grad(overlap_fn)(sf.apply_updates(params, step))
    y = sf.tree.ravel(g1).flat - sf.tree.ravel(g0).flat
    torch.testing.assert_close(new_state.memory.pairs[-1][1], y)  # the newest (s, y)
    torch.testing.assert_close(new_state.memory.pairs[-1][0], sf.tree.ravel(step).flat)
    # Changing the examples outside the overlap changes the step's gradient, not the pair.
    other = (torch.cat([batch[0][:8] * 3, batch[0][8:]]), batch[1])
    assert torch.equal(batch_overlap(other, 4)[0], overlap[0])
    _, s2 = opt.update(
        grad, state, params, overlap_value_fn=training.bind_batch(loss_fn, batch_overlap(other, 4))
    )
    torch.testing.assert_close(s2.memory.pairs[-1][1], y)
    # The full-batch pair differs: the pair really is the overlap's.
    _, gb0 = sf.value_and_grad(value_fn)(params)
    _, gb1 = sf.value_and_grad(value_fn)(sf.apply_updates(params, step))
    assert not torch.allclose(sf.tree.ravel(gb1).flat - sf.tree.ravel(gb0).flat, y, rtol=1e-3)


def test_multi_batch_two_loop_matches_dense_bfgs_recursion():
    """With pairs stored, -H g equals the dense inverse-BFGS recursion (N&W eq. 6.17)
    started from gamma I with gamma from the newest pair (eq. 7.20)."""
    torch.manual_seed(0)
    n = 6
    a = torch.randn(n, n, dtype=torch.float64)
    hess = a @ a.T + n * torch.eye(n, dtype=torch.float64)
    opt = multi_batch_lbfgs(memory_size=3, learning_rate=0.3)
    x = {"x": torch.randn(n, dtype=torch.float64)}

    def quad(p):
        return 0.5 * p["x"] @ hess @ p["x"]

    state = opt.init(x)
    pairs = []
    for _ in range(5):
        _, g = sf.value_and_grad(quad)(x)
        step, state = opt.update(g, state, x, overlap_value_fn=quad)
        pairs.append((step["x"], hess @ step["x"]))
        x = sf.apply_updates(x, step)
    _, g = sf.value_and_grad(quad)(x)
    kept = pairs[-3:]
    s, y = kept[-1]
    h = (s @ y) / (y @ y) * torch.eye(n, dtype=torch.float64)
    for s, y in kept:
        rho = 1 / (s @ y)
        v = torch.eye(n, dtype=torch.float64) - rho * torch.outer(y, s)
        h = v.T @ h @ v + rho * torch.outer(s, s)
    step, _ = opt.update(g, state, x, overlap_value_fn=quad)
    torch.testing.assert_close(step["x"], -0.3 * h @ g["x"])


def test_multi_batch_skips_negative_curvature_pairs():
    opt = multi_batch_lbfgs(memory_size=2)
    p = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}

    def concave(q):
        return -0.5 * (q["x"] ** 2).sum()

    state = opt.init(p)
    _, g = sf.value_and_grad(concave)(p)
    _, state = opt.update(g, state, p, overlap_value_fn=concave)
    assert int(state.num_skipped) == 1 and not state.memory.valid.any()


def test_multi_batch_lbfgs_is_pure_and_validates(dtype):
    params, batch, _, loss_fn = _mlp_problem(dtype, "cpu")
    value_fn = training.bind_batch(loss_fn, batch)
    _, grad = sf.value_and_grad(value_fn)(params)
    assert_update_is_pure(
        multi_batch_lbfgs(4, 0.5),
        params,
        grad,
        value_fn=value_fn,
        overlap_value_fn=training.bind_batch(loss_fn, batch_overlap(batch, 6)),
    )
    with pytest.raises(TypeError, match="overlap_value_fn"):
        multi_batch_lbfgs().update(grad, multi_batch_lbfgs().init(params), params)
    with pytest.raises(ValueError, match="memory_size"):
        multi_batch_lbfgs(memory_size=0)


def test_backtrack_schedule():
    assert _backtrack_schedule(10, 1.3) == [1, 2, 3, 4, 5, 7, 9, 10]  # ceil(1.3^j), j = 0..8
    assert _backtrack_schedule(1, 1.3) == [1]


def test_hessian_free_cg_solves_the_damped_quadratic(device):
    """On a quadratic with enough CG iterations, the step is the damped Newton step
    -(A + lambda I)^{-1} g and the reduction ratio follows the exact model."""
    dtype = torch.float64
    torch.manual_seed(0)
    n = 8
    a = torch.randn(n, n, dtype=dtype)
    hess = (a @ a.T + torch.eye(n, dtype=dtype)).to(device)
    center = torch.randn(n, dtype=dtype).to(device)

    def quad(p):
        d = p["x"] - center
        return 0.5 * d @ hess @ d

    params = {"x": torch.zeros(n, dtype=dtype, device=device)}
    opt = hessian_free(damping=0.5, max_cg_iters=40, warm_start_decay=0.0)
    value, grad = sf.value_and_grad(quad)(params)
    step, state = opt.update(grad, opt.init(params), params, value=value, value_fn=quad)
    expected = -torch.linalg.solve(hess + 0.5 * torch.eye(n, dtype=dtype, device=device), grad["x"])
    torch.testing.assert_close(step["x"], expected)
    q = grad["x"] @ expected + 0.5 * expected @ hess @ expected
    torch.testing.assert_close(
        state.reduction_ratio, (quad(sf.apply_updates(params, step)) - value) / q
    )
    # rho = 1 exactly on a quadratic model of itself... but the damped step gives rho in (0.75, 1]
    assert 0.75 < float(state.reduction_ratio) <= 1 + 1e-12
    torch.testing.assert_close(state.damping, torch.tensor(0.5 * 2 / 3, dtype=dtype, device=device))


def test_hessian_free_rejects_a_bad_step_and_raises_damping():
    """A curvature that badly underestimates (B = 0.01 I on a steep quadratic) gives CG
    iterates that all raise the loss: no step, damping times 3/2."""
    params = {"x": torch.tensor([1.0, -1.0], dtype=torch.float64)}

    def steep(p):
        return 50.0 * (p["x"] ** 2).sum()

    opt = hessian_free(damping=1e-3, max_cg_iters=3)
    value, grad = sf.value_and_grad(steep)(params)
    step, state = opt.update(
        grad,
        opt.init(params),
        params,
        value=value,
        value_fn=steep,
        curvature=lambda v: sf.tree.scale(0.01, v),
    )
    assert torch.all(step["x"] == 0)
    torch.testing.assert_close(state.damping, torch.tensor(1.5e-3, dtype=torch.float64))


def test_hessian_free_with_subsampled_ggn_trains_and_is_pure(dtype, device):
    params, batch, apply_fn, loss_fn = _mlp_problem(dtype, device, n=64)
    value_fn = training.bind_batch(loss_fn, batch)
    value0 = value_fn(params)
    opt = hessian_free(damping=0.1)
    state = opt.init(params)
    values = [value0]
    for _ in range(8):
        curvature = training.ggn_operator(
            apply_fn, cross_entropy, params, training.subsample(batch, 16)
        )
        params, state, _ = training.training_step(
            opt, loss_fn, params, state, batch, curvature=curvature
        )
        values.append(value_fn(params))
    # Backtracking only accepts a lower batch loss: the sequence never increases.
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert values[-1] < 0.85 * value0
    assert state.damping.device == params["w1"].device and state.damping.dtype == dtype
    _, grad = sf.value_and_grad(value_fn)(params)
    assert_update_is_pure(opt, params, grad, value_fn=value_fn)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(grad, state, params)
    with pytest.raises(ValueError, match="max_cg_iters"):
        hessian_free(max_cg_iters=0)


def test_hessian_free_runs_under_minimize_and_publishes_its_damping():
    """Full-batch, HF is a damped truncated Newton method: on a convex quadratic it
    converges under the driver, and its damping/ratio appear in the history."""
    torch.manual_seed(1)
    n = 6
    a = torch.randn(n, n, dtype=torch.float64)
    hess = a @ a.T + torch.eye(n, dtype=torch.float64)
    center = torch.randn(n, dtype=torch.float64)

    def quad(p):
        d = p["x"] - center
        return 0.5 * d @ hess @ d

    result = sf.minimize(
        quad, {"x": torch.zeros(n, dtype=torch.float64)}, hessian_free(), gtol=1e-8
    )
    assert result.converged, result.reason
    torch.testing.assert_close(result.params["x"], center)
    assert "hessian_free_damping" in result.history[-1]
    assert "hessian_free_reduction_ratio" in result.history[-1]
