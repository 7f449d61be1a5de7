"""ssbfgs(memory_size=m), the limited-memory self-scaled BFGS, against independent
references: the dense ssbfgs direction while the memory holds every pair, the SSBFGS
updates of the last m pairs unrolled with explicit numpy matrices once it wraps, L-BFGS when
the scaling is 1, the published curvature as the inverse of the direction's matrix, the
scipy BFGS minimum on Moré-Garbow-Hillstrom problems, torch.compile and vmap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_update_is_pure
from test_lbfgs import no_host_sync, quadratic_sequence
from test_self_scaled import SOLVED, scipy_bfgs_value

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED
from soo_func.directions.self_scaled_memory import pair_weights

D = torch.float64


def quadratic(n: int, seed: int):
    """``0.5 x^T A x - r^T x`` with eigenvalues of ``A`` in about ``[0.05, 2]``: with
    ``H0 = I`` the early pairs have ``b > 1`` (``tau < 1``), so the scaling acts."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    a = q @ torch.diag(torch.logspace(math.log10(0.05), math.log10(2.0), n, dtype=D)) @ q.T
    return a, torch.randn(n, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)


ALPHAS = [0.3, 0.8, 1.0, 0.55, 1.4, 0.9, 1.1, 0.7, 1.2, 0.6]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scaling", ["al-baali", "oren-luenberger"])
@pytest.mark.parametrize("initial_scaling", [1.0, 0.25])
def test_matches_dense_ssbfgs_while_the_memory_holds_every_pair(seed, scaling, initial_scaling):
    n = 8
    a, rhs, x = quadratic(n, seed)
    dense = sf.ssbfgs(scaling=scaling, initial_scaling=initial_scaling)
    limited = sf.ssbfgs(memory_size=12, scaling=scaling, initial_scaling=initial_scaling)
    s_dense, s_limited = dense.init(x), limited.init(x)
    scaled = False
    for alpha in [*ALPHAS, None]:
        d_dense, s_dense = dense.update(a @ x - rhs, s_dense, x)
        d_limited, s_limited = limited.update(a @ x - rhs, s_limited, x)
        torch.testing.assert_close(d_limited, d_dense, rtol=1e-10, atol=1e-12)
        assert torch.equal(s_limited.step_hint, s_dense.step_hint)
        scaled |= bool((s_limited.inv_tau != 1).any())
        if alpha is not None:
            x = x + alpha * d_dense
    assert scaled  # some tau != 1: the weights were exercised


def unrolled(pairs, h0: float, n: int) -> np.ndarray:
    """``H = (1/tau) V^T H V + rho s s^T`` over ``(s, y, tau)``, oldest first, from ``h0 I``."""
    h = h0 * np.eye(n)
    for s, y, tau in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v / tau + rho * np.outer(s, s)
    return h


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("memory_size", [1, 3])
def test_matches_the_unrolled_last_m_updates_once_the_memory_wraps(seed, memory_size):
    """Reference: every ``tau_j = min(1, 1/b_j)`` with ``b_j = s_j^T inv(H) s_j / s_j^T y_j``
    of the (reference) matrix ``H`` that made the step's direction."""
    n = 8
    a, rhs, x = quadratic(n, seed)
    transform = sf.ssbfgs(memory_size=memory_size)
    state = transform.init(x)
    pairs: list = []
    h = np.eye(n)
    for alpha in [*ALPHAS, None]:
        g = (a @ x - rhs).numpy()
        d, state = transform.update(a @ x - rhs, state, x)
        want = -h @ g
        np.testing.assert_allclose(d.numpy(), want, rtol=1e-10, atol=1e-12)
        if alpha is None:
            break
        s = alpha * want
        y = a.numpy() @ s
        b = s @ np.linalg.solve(h, s) / (s @ y)
        pairs = [*pairs, (s, y, min(1.0, 1.0 / b))][-memory_size:]
        h = unrolled(pairs, 1.0, n)
        x = x + torch.from_numpy(s)
    assert any(tau < 1 for _, _, tau in pairs) or memory_size == 1


@pytest.mark.parametrize("initial_scaling", [None, 1.0, 0.5])
@pytest.mark.parametrize("memory_size", [1, 4])
def test_unscaled_is_lbfgs_exactly(initial_scaling, memory_size):
    seq = quadratic_sequence(6, 10, D, seed=5)
    ours = sf.ssbfgs(memory_size=memory_size, scaling="none", initial_scaling=initial_scaling)
    theirs = sf.lbfgs(memory_size, initial_scaling=initial_scaling, first_step_norm=2)
    s_ours, s_theirs = ours.init(seq[0][0]), theirs.init(seq[0][0])
    for x, g in seq:
        d_ours, s_ours = ours.update(g, s_ours, x)
        d_theirs, s_theirs = theirs.update(g, s_theirs, x)
        assert torch.equal(d_ours, d_theirs)
        assert torch.equal(s_ours.step_hint, s_theirs.step_hint)
        assert torch.equal(s_ours.memory.valid, s_theirs.memory.valid)


def test_pair_weights_are_the_products_of_the_later_factors():
    inv_tau = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=D)
    valid = torch.tensor([True, True, False, True])
    w, total = pair_weights(inv_tau, valid)
    assert w.tolist() == [21.0, 7.0, 7.0, 1.0] and float(total) == 42.0


@pytest.mark.parametrize("memory_size", [2, 20])
def test_published_curvature_inverts_the_direction_matrix(memory_size):
    """``B (H g) = g``, ``B`` from the compact direct form on the rescaled pairs."""
    n = 8
    a, rhs, x = quadratic(n, 1)
    transform = sf.ssbfgs(memory_size=memory_size, scaling="oren-luenberger")
    state = transform.init(x)
    for alpha in ALPHAS[:6]:
        d, state = transform.update(a @ x - rhs, state, x)
        x = x + alpha * d
    g = a @ x - rhs
    d, state = transform.update(g, state, x)
    assert bool((state.inv_tau != 1)[state.memory.valid].all())
    curvature = transform.publish(state, x)["curvature"]
    torch.testing.assert_close(curvature(-d), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SOLVED)
@pytest.mark.parametrize("memory_size", [5, 20])
def test_reaches_the_scipy_bfgs_minimum(name, memory_size):
    p = UNCONSTRAINED[name]
    optimizer = sf.chain(sf.ssbfgs(memory_size=memory_size), sf.wolfe())
    result = sf.minimize(p.fn, p.x0.clone(), optimizer, max_steps=3000, gtol=1e-5)
    assert float(sf.tree.norm(result.grad, math.inf)) <= 1e-5, result.reason
    assert math.isclose(float(result.value), scipy_bfgs_value(p), rel_tol=1e-6, abs_tol=1e-5)


def test_update_is_pure_host_sync_free_and_float32():
    a, rhs, x = quadratic(5, 2)

    def loss(p):
        return 0.5 * p @ a @ p - rhs @ p

    value, grad = sf.value_and_grad(loss)(x)
    transform = sf.chain(sf.ssbfgs(memory_size=3), sf.armijo_sync_free())
    assert_update_is_pure(transform, x, grad, steps=4, value=value, value_fn=loss)
    state = transform.init(x)
    with no_host_sync():
        transform.update(grad, state, x, value=value, grad=grad, value_fn=loss)
    a32, rhs32 = a.float(), rhs.float()
    result = sf.minimize(
        lambda p: 0.5 * p @ a32 @ p - rhs32 @ p,
        x.float(),
        sf.chain(sf.ssbfgs(memory_size=4), sf.wolfe()),
        gtol=1e-4,
    )
    torch.testing.assert_close(result.params, torch.linalg.solve(a32, rhs32), rtol=2e-3, atol=2e-3)


def test_ascent_resets_the_memory_and_its_weights():
    a, rhs, x = quadratic(5, 0)
    transform = sf.ssbfgs(memory_size=3)
    state = transform.init(x)
    for alpha in ALPHAS[:4]:
        d, state = transform.update(a @ x - rhs, state, x)
        x = x + alpha * d
    _, state = transform.update(torch.full((5,), math.nan, dtype=D), state, x)
    assert not bool(state.memory.valid.any()) and bool((state.inv_tau == 1).all())


@pytest.mark.parametrize("memory_size", [0, -1, 2.5, True, "3"])
def test_bad_memory_size(memory_size):
    with pytest.raises(ValueError, match="memory_size must be a positive int"):
        sf.ssbfgs(memory_size=memory_size)


def test_ssbroyden_refuses_limited_memory():
    with pytest.raises(ValueError, match=r"must be None.*dense ssbroyden\(\)"):
        sf.ssbroyden(memory_size=5)


def driven(step, transform, a, rhs, x, steps: int = 6):
    """``steps`` updates of ``transform`` (through ``step``) along unit steps."""
    state, taken = transform.init(x), []
    for _ in range(steps):
        d, state = step(transform, a @ x - rhs, state, x)
        taken.append(d)
        x = x + d
    return torch.stack(taken)


def eager_step(transform, g, state, x):
    return transform.update(g, state, x)


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager():
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("dynamo is not supported on this platform")
    a, rhs, x = quadratic(6, 3)
    transform = sf.ssbfgs(memory_size=3)
    torch._dynamo.reset()
    update = torch.compile(transform.update, fullgraph=True, backend="aot_eager")
    traced = driven(lambda t, g, s, p: update(g, s, p), transform, a, rhs, x)
    torch._dynamo.reset()
    eager = driven(eager_step, transform, a, rhs, x)
    torch.testing.assert_close(traced, eager, rtol=1e-11, atol=1e-11)


def test_vmapped_matches_a_loop():
    problems = [quadratic(5, seed) for seed in range(3)]
    a, rhs, x = (torch.stack(parts) for parts in zip(*problems, strict=True))

    def one(a, rhs, x):
        return driven(eager_step, sf.ssbfgs(memory_size=2), a, rhs, x)

    batched = torch.func.vmap(one)(a, rhs, x)
    for i, (a_i, rhs_i, x_i) in enumerate(problems):
        torch.testing.assert_close(batched[i], one(a_i, rhs_i, x_i), rtol=1e-10, atol=1e-12)
