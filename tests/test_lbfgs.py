"""L-BFGS: the two-loop product against N&W eq. 7.19 built densely, skips, resets, purity,
no host synchronisation."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import assert_update_is_pure

import soo_func as sf
from soo_func.directions.compact import bfgs_inverse_kernel, kernel_apply
from soo_func.directions.lbfgs import lbfgs


@contextlib.contextmanager
def no_host_sync():
    """Make every Python-level way of reading a tensor value on the host raise."""
    names = ["item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside update")

        return raiser

    try:
        for name in names:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def quadratic_sequence(n, steps, dtype, seed=0):
    """Points x_k and gradients g_k = A x_k + b of a random SPD quadratic."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    xs = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return [(x.to(dtype), (a @ x + b).to(dtype)) for x in xs]


def dense_lbfgs_matrix(pairs, n, gamma=None):
    """N&W eq. 7.19: H = V^T..V^T (gamma I) V..V + ... built as the BFGS recursion (eq. 6.17)
    from H0 = gamma I over the given pairs, oldest first, in float64."""
    if gamma is None:
        s, y = pairs[-1]
        gamma = (s @ y) / (y @ y)
    h = gamma * torch.eye(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = eye - rho * torch.outer(y, s)
        h = v.T @ h @ v + rho * torch.outer(s, s)
    return h


def split(x, sizes=(3, 4)):
    """A two-leaf pytree view of a flat vector (to exercise ravel/unravel)."""
    a, b = torch.split(x, list(sizes))
    return {"a": a.clone(), "b": b.reshape(2, 2).clone()}


def flat(tree):
    return sf.tree.ravel(tree).flat


@pytest.mark.parametrize("memory_size", [1, 3, 10])
def test_two_loop_equals_dense_eq_7_19(memory_size, dtype):
    n, steps = 7, 9
    seq = quadratic_sequence(n, steps, dtype)
    transform = lbfgs(memory_size)
    state = transform.init(split(seq[0][0]))
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for k, (x, g) in enumerate(seq):
        direction, state = transform.update(split(g), state, split(x))
        pairs = [
            ((seq[i][0] - seq[i - 1][0]).double(), (seq[i][1] - seq[i - 1][1]).double())
            for i in range(max(1, k - memory_size + 1), k + 1)
        ]
        matrix = dense_lbfgs_matrix(pairs, n) if pairs else torch.eye(n, dtype=torch.float64)
        expected = -matrix @ g.double()
        got = flat(direction)
        assert got.dtype == dtype
        scale = expected.abs().max()
        assert (got.double() - expected).abs().max() <= tol * scale, k


def test_fixed_initial_scaling_and_gamma(dtype):
    n = 5
    seq = quadratic_sequence(n, 4, dtype, seed=3)
    transform = lbfgs(5, initial_scaling=0.5)
    state = transform.init(seq[0][0])
    for x, g in seq:
        direction, state = transform.update(g, state, x)
    pairs = [
        ((seq[i][0] - seq[i - 1][0]).double(), (seq[i][1] - seq[i - 1][1]).double())
        for i in range(1, 4)
    ]
    expected = -dense_lbfgs_matrix(pairs, n, gamma=0.5) @ seq[-1][1].double()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert torch.allclose(direction.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    assert float(state.gamma) == 0.5


def test_skipped_pair_is_left_out_and_occupies_its_slot():
    n = 4
    dtype = torch.float64
    seq = quadratic_sequence(n, 4, dtype, seed=1)
    x3 = seq[2][0] + torch.tensor([1.0, 0, 0, 0], dtype=dtype)
    g3 = seq[2][1] - torch.tensor([1.0, 0, 0, 0], dtype=dtype)  # s^T y = -1 < 0: skipped
    seq = [*seq[:3], (x3, g3)]
    transform = lbfgs(3)
    state = transform.init(seq[0][0])
    for x, g in seq:
        direction, state = transform.update(g, state, x)
    assert state.memory.valid.tolist() == [True, True, False]
    pairs = [(seq[i][0] - seq[i - 1][0], seq[i][1] - seq[i - 1][1]) for i in (1, 2)]
    expected = -dense_lbfgs_matrix(pairs, n) @ g3
    assert torch.allclose(direction, expected, rtol=1e-10, atol=1e-12)


def test_not_descent_resets_memory_to_steepest_descent():
    # With pairs of positive curvature H is SPD, so only corrupted numbers (overflow, NaN)
    # make -H g fail the descent test: poison the kept pair's inner products with NaN.
    n = 3
    dtype = torch.float64
    seq = quadratic_sequence(n, 3, dtype, seed=2)
    transform = lbfgs(2)
    state = transform.init(seq[0][0])
    for x, g in seq[:2]:
        _, state = transform.update(g, state, x)
    memory = state.memory._replace(gram=state.memory.gram * float("nan"))
    state = state._replace(memory=memory)
    x, g = seq[2]
    direction, state = transform.update(g, state, x)
    assert not state.memory.valid.any()
    assert torch.allclose(direction, -g)


def test_published_curvature_is_inverse_of_h(dtype):
    n = 6
    seq = quadratic_sequence(n, 5, dtype, seed=4)
    transform = lbfgs(3)
    state = transform.init(seq[0][0])
    for x, g in seq:
        _, state = transform.update(g, state, x)
    published = sf.publish(transform, state, seq[-1][0])
    curvature = published["curvature"]
    memory = state.memory
    kernel = bfgs_inverse_kernel(memory.gram, memory.valid, state.gamma)
    eye = torch.eye(n, dtype=dtype)
    h = torch.stack([kernel_apply(memory, kernel, state.gamma, e) for e in eye], 1)
    b = torch.stack([curvature(e) for e in eye], 1)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(b @ h, eye, atol=tol)
    pairs = [(seq[i][0] - seq[i - 1][0], seq[i][1] - seq[i - 1][1]) for i in (2, 3, 4)]
    dense = dense_lbfgs_matrix([(s.double(), y.double()) for s, y in pairs], n)
    assert torch.allclose(h.double(), dense, atol=tol * dense.abs().max())


def test_update_is_pure_and_sync_free(dtype):
    def loss(p):
        return ((p["w"] - 1.0) ** 4).sum() + (p["b"] ** 2).sum()

    params = {
        "w": torch.linspace(-1, 2, 6, dtype=dtype).reshape(2, 3),
        "b": torch.ones(2, dtype=dtype),
    }
    value, grad = sf.value_and_grad(loss)(params)
    transform = lbfgs(2)
    assert_update_is_pure(transform, params, grad, steps=4, value=value, value_fn=loss)
    state = transform.init(params)
    for _ in range(4):
        with no_host_sync():
            direction, state = transform.update(grad, state, params)
        params = sf.apply_updates(params, sf.tree.scale(0.1, direction))
        value, grad = sf.value_and_grad(loss)(params)
        assert sf.tree.leaves(direction)[0].dtype == dtype
    assert state.memory.valid.any()


def test_minimize_quadratic_with_unit_steps_terminates():
    # On a strongly convex quadratic with exact-ish unit steps L-BFGS must converge.
    n = 8
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = a @ a.T / n + torch.eye(n, dtype=torch.float64)

    def loss(x):
        return 0.5 * x @ a @ x - x.sum()

    result = sf.minimize(
        loss,
        torch.zeros(n, dtype=torch.float64),
        sf.chain(lbfgs(8), sf.scale(1.0)),
        max_steps=200,
        gtol=1e-8,
    )
    assert result.converged
    assert torch.allclose(
        result.params, torch.linalg.solve(a, torch.ones(n, dtype=torch.float64)), atol=1e-6
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory_size"):
        lbfgs(0)
    with pytest.raises(ValueError, match="initial_scaling"):
        lbfgs(3, initial_scaling=-1.0)
    with pytest.raises(ValueError, match="first_step_norm"):
        lbfgs(3, first_step_norm=3)
    transform = lbfgs(3)
    state = transform.init(torch.zeros(2))
    with pytest.raises(TypeError, match="params"):
        transform.update(torch.zeros(2), state)


@pytest.mark.parametrize(
    ("order", "expected"),
    [(1, 1 / 7.0), (2, 1 / 5.0), (math.inf, 1 / 4.0)],  # g = (3, -4): |g|_1 = 7, |g|_2 = 5
)
def test_first_step_hint_is_inverse_gradient_norm_until_a_pair_is_stored(order, expected):
    transform = lbfgs(3, first_step_norm=order)
    params = torch.zeros(2, dtype=torch.float64)
    grad = torch.tensor([3.0, -4.0], dtype=torch.float64)
    state = transform.init(params)
    direction, state = transform.update(grad, state, params)
    assert torch.equal(direction, -grad)
    assert float(state.step_hint) == pytest.approx(expected, rel=1e-15)
    assert float(transform.publish(state, params)["step_hint"]) == pytest.approx(expected)
    # With a stored pair the hint is the quasi-Newton unit step.
    params2 = params + 0.1 * direction
    _, state = transform.update(grad * 0.5, state, params2)
    assert float(state.step_hint) == 1.0
    # A tiny gradient never asks for more than a unit step.
    state = transform.init(params)
    _, state = transform.update(torch.full((2,), 1e-3, dtype=torch.float64), state, params)
    assert float(state.step_hint) == 1.0


def test_same_iterates_and_evaluations_as_torch_lbfgs_on_a_quadratic():
    """``chain(lbfgs(m), wolfe())`` against ``torch.optim.LBFGS(history_size=m,
    line_search_fn="strong_wolfe")`` (an independent implementation: vector two-loop, its
    own strong Wolfe search) on a strongly convex quadratic where every trial is accepted
    (the first step ``1 / |g|_1`` and then unit steps): the same iterates to rounding, the
    same number of evaluations, no pair dropped or memory reset along the way."""
    n, m, steps = 12, 5, 10
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.linspace(1.0, 3.0, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss(x):
        return 0.5 * x @ a @ x - b @ x

    x0 = torch.linalg.solve(a, b) + 0.25 * torch.randn(n, generator=gen, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    peer = torch.optim.LBFGS(
        [x], history_size=m, line_search_fn="strong_wolfe", max_iter=1,
        tolerance_grad=0.0, tolerance_change=0.0,
    )  # fmt: skip
    peer_iterates, peer_evals = [], 0

    def closure():
        nonlocal peer_evals
        peer_evals += 1
        peer.zero_grad()
        value = loss(x)
        value.backward()
        return value

    for _ in range(steps):
        peer.step(closure)
        peer_iterates.append(x.detach().clone())
    search_evals = peer_evals - steps  # each step() call first evaluates its start
    iterates = []
    ours = sf.minimize(
        loss, x0, sf.chain(lbfgs(m), sf.wolfe()), max_steps=steps, gtol=0.0,
        callback=lambda row, params: iterates.append(params.clone()),
    )  # fmt: skip
    assert ours.num_steps == steps
    assert search_evals == steps  # every first trial accepted
    assert ours.num_value_evals == 1 + search_evals  # the start, then the searches' trials
    torch.testing.assert_close(
        torch.stack(iterates), torch.stack(peer_iterates), rtol=1e-9, atol=1e-12
    )


def filled_memory(m: int, n: int):
    """``lbfgs(m)`` after ``m + 2`` short steps on ``diag(scale)``: the transform, ``scale``,
    the point reached, the state there and the last direction."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    transform, x = lbfgs(m), torch.randn(n, generator=gen, dtype=torch.float64)
    state = transform.init(x)
    for _ in range(m + 2):
        direction, state = transform.update(scale * x, state, x)
        x = x + 0.01 * direction
    return transform, scale, x, state, direction


def test_update_operations_do_not_grow_with_the_memory_for_short_vectors():
    """For short vectors the memory is one stacked tensor: an update with 100 pairs runs the
    same tensor operations as one with 5 (per-slot operations made ``lbfgs(100)`` on a
    921-parameter PINN about twice as costly per step as ``torch.optim.LBFGS``)."""

    class Count(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    def count(m, n=921):
        transform, scale, x, state, _ = filled_memory(m, n)
        with Count() as counter:
            transform.update(scale * x, state, x)
        return counter.calls

    assert count(100) == count(5)


def test_long_vectors_are_kept_as_separate_flat_tensors():
    """For long vectors every stored vector (each slot's ``s`` and ``y``, the last point's
    ``x`` and ``g``) is its own ``[n]`` tensor: no ``[2, n]`` buffer, which at ``n = 2^21``
    in float64 crosses glibc's 32 MiB mmap line and page-faults afresh at every step."""
    n, m = 20_000, 4  # 2 m n above STACK_ALWAYS_ELEMENTS, n above STACK_MAX_SLOT: the tuple
    _, _, x, state, direction = filled_memory(m, n)
    assert isinstance(state.memory.pairs, tuple)
    vectors = [v for pair in (*state.memory.pairs, state.last.point) for v in pair]
    assert len(vectors) == 2 * m + 2
    assert all(v.shape == (n,) for v in vectors)
    storages = {v.untyped_storage().data_ptr() for v in vectors}
    assert len(storages) == len(vectors)
    torch.testing.assert_close(state.last.point[0], x - 0.01 * direction)
