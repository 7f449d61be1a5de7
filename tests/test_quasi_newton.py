"""Dense and limited-memory BFGS, DFP, SR1, Broyden: secant conditions, the dense
recursions, compact == dense while the memory holds every pair, curvature = H^{-1},
damping and skip rules, purity, no host synchronisation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_update_is_pure
from test_lbfgs import dense_lbfgs_matrix, no_host_sync, quadratic_sequence

import soo_func as sf
from soo_func.directions.quasi_newton import bfgs, broyden, dfp, sr1

CONSTRUCTORS = {"bfgs": bfgs, "dfp": dfp, "sr1": sr1, "broyden": broyden}
FORMS = ["inverse", "direct"]


def near_identity_sequence(n, steps, dtype, seed=0):
    """Gradients of a quadratic whose Hessian is close to I, so SR1 and Broyden stay
    descent methods and never reset (x_k random)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.15
    a = torch.eye(n, dtype=torch.float64) + a @ a.T
    xs = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return [(x.to(dtype), (a @ x).to(dtype)) for x in xs]


def run(transform, seq):
    state = transform.init(seq[0][0])
    directions = []
    for x, g in seq:
        d, state = transform.update(g, state, x)
        directions.append(d)
    return directions, state


def tol_for(dtype):
    return 1e-9 if dtype == torch.float64 else 2e-3


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", list(CONSTRUCTORS))
def test_dense_secant_condition(method, form, dtype):
    n = 6
    seq = near_identity_sequence(n, 5, dtype)
    transform = CONSTRUCTORS[method](form=form)
    state = transform.init(seq[0][0])
    for k, (x, g) in enumerate(seq):
        _, state = transform.update(g, state, x)
        # SR1's first pair after eq. 6.20's scaling has y^T (s - H0 y) = 0: it is skipped
        # (the inverse update is undefined, the direct one singular); later ones are used.
        if k == 0 or (method == "sr1" and k == 1):
            continue
        s, y = x - seq[k - 1][0], g - seq[k - 1][1]
        matrix = state.matrix
        lhs, rhs = (matrix @ y, s) if form == "inverse" else (matrix @ s, y)
        assert torch.allclose(lhs, rhs, atol=tol_for(dtype) * rhs.abs().max()), (method, k)


@pytest.mark.parametrize("form", FORMS)
def test_dense_bfgs_equals_eq_6_17_recursion(form):
    n, dtype = 5, torch.float64
    seq = quadratic_sequence(n, 6, dtype, seed=7)
    directions, state = run(bfgs(form=form), seq)
    pairs = [(seq[i][0] - seq[i - 1][0], seq[i][1] - seq[i - 1][1]) for i in range(1, 6)]
    s0, y0 = pairs[0]
    h = dense_lbfgs_matrix(pairs, n, gamma=(s0 @ y0) / (y0 @ y0))  # eq. 6.20 then eq. 6.17
    matrix = state.matrix if form == "inverse" else torch.linalg.inv(state.matrix)
    assert torch.allclose(matrix, h, atol=1e-9 * h.abs().max())
    assert torch.allclose(directions[-1], -h @ seq[-1][1], atol=1e-9)


@pytest.mark.parametrize("method", list(CONSTRUCTORS))
def test_dense_forms_are_inverses(method):
    n, dtype = 6, torch.float64
    seq = near_identity_sequence(n, 6, dtype, seed=2)
    d_inv, inv_state = run(CONSTRUCTORS[method](form="inverse"), seq)
    d_dir, dir_state = run(CONSTRUCTORS[method](form="direct"), seq)
    eye = torch.eye(n, dtype=dtype)
    assert torch.allclose(inv_state.matrix @ dir_state.matrix, eye, atol=1e-9)
    for a, b in zip(d_inv, d_dir, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", list(CONSTRUCTORS))
def test_limited_memory_equals_dense_while_memory_holds_every_pair(method, form, dtype):
    n, steps = 7, 6
    seq = near_identity_sequence(n, steps, dtype, seed=3)
    make = CONSTRUCTORS[method]
    dense, _ = run(make(form=form, initial_scaling=0.8), seq)
    limited, state = run(make(steps, form=form, initial_scaling=0.8), seq)
    assert int(state.memory.valid.sum()) == steps - 1
    for k, (a, b) in enumerate(zip(dense, limited, strict=True)):
        assert b.dtype == dtype
        assert torch.allclose(a, b, atol=tol_for(dtype) * a.abs().max()), (method, form, k)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", list(CONSTRUCTORS))
def test_limited_memory_forms_agree_with_adaptive_scaling(method, form):
    # With H0 = gamma_k I (eq. 7.20) and a memory smaller than the number of pairs, the
    # inverse and direct compact forms are two formulas for the same matrix.
    n, dtype = 7, torch.float64
    seq = near_identity_sequence(n, 8, dtype, seed=4)
    make = CONSTRUCTORS[method]
    inverse, _ = run(make(3, form="inverse"), seq)
    direct, _ = run(make(3, form="direct"), seq)
    for a, b in zip(inverse, direct, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_limited_bfgs_equals_lbfgs():
    n, dtype = 7, torch.float64
    seq = quadratic_sequence(n, 8, dtype, seed=5)
    a, _ = run(bfgs(3), seq)
    b, _ = run(sf.directions.lbfgs(3), seq)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-10)


@pytest.mark.parametrize("memory_size", [None, 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", [*CONSTRUCTORS, "lbfgs"])
def test_published_curvature_inverts_the_direction(method, form, memory_size, dtype):
    """``B d = -g``: the published curvature is the inverse of the H that made d."""
    if method == "lbfgs":
        if form == "direct" or memory_size is None:
            pytest.skip("lbfgs has one form")
        transform = sf.directions.lbfgs(memory_size)
    else:
        transform = CONSTRUCTORS[method](memory_size, form=form)
    seq = near_identity_sequence(5, 6, dtype, seed=6)
    tree_seq = [({"u": x[:2], "v": x[2:]}, {"u": g[:2], "v": g[2:]}) for x, g in seq]
    state = transform.init(tree_seq[0][0])
    for x, g in tree_seq:
        d, state = transform.update(g, state, x)
        curvature = sf.publish(transform, state, x)["curvature"]
        bd = curvature(d)
        for got, want in zip(sf.tree.leaves(bd), sf.tree.leaves(g), strict=True):
            assert torch.allclose(got, -want, atol=tol_for(dtype) * 10), (method, form)


def test_powell_damping_keeps_b_positive_definite():
    n, dtype = 4, torch.float64
    x0, g0 = torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)
    x1 = torch.tensor([1.0, 0, 0, 0], dtype=dtype)
    g1 = g0 - torch.tensor([2.0, 0.5, 0, 0], dtype=dtype)  # s^T y = -2: negative curvature
    transform = bfgs(form="direct", damping=True, initial_scaling=1.0)
    state = transform.init(x0)
    _, state = transform.update(g0, state, x0)
    _, state = transform.update(g1, state, x1)
    s, y, b0 = x1 - x0, g1 - g0, torch.eye(n, dtype=dtype)
    sbs = s @ b0 @ s
    theta = 0.8 * sbs / (sbs - s @ y)
    r = theta * y + (1 - theta) * b0 @ s
    assert torch.allclose(state.matrix @ s, r, atol=1e-12)  # secant with the damped pair
    assert torch.isclose(s @ r, 0.2 * sbs)
    assert torch.linalg.eigvalsh(state.matrix).min() > 0
    undamped = bfgs(form="direct", initial_scaling=1.0)
    state = undamped.init(x0)
    _, state = undamped.update(g0, state, x0)
    _, state = undamped.update(g1, state, x1)
    assert torch.equal(state.matrix, b0)  # the same pair is skipped without damping


@pytest.mark.parametrize("memory_size", [None, 4])
def test_sr1_skips_pair_with_vanishing_denominator(memory_size):
    n, dtype = 3, torch.float64
    x0, g0 = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    x1 = torch.tensor([1.0, 0, 0], dtype=dtype)
    g1 = torch.tensor([1.0, 1.0, 0], dtype=dtype)  # y - B s = (0, 1, 0) is orthogonal to s
    transform = sr1(memory_size, form="direct", initial_scaling=1.0)
    state = transform.init(x0)
    _, state = transform.update(g0, state, x0)
    d, state = transform.update(g1, state, x1)
    assert torch.allclose(d, -g1)  # B stays I
    if memory_size is None:
        assert torch.equal(state.matrix, torch.eye(n, dtype=dtype))
    else:
        assert not state.memory.valid.any()


@pytest.mark.parametrize("memory_size", [None, 2])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", list(CONSTRUCTORS))
def test_update_is_pure_and_sync_free(method, form, memory_size, dtype):
    def loss(p):
        return ((p["w"] - 1.0) ** 4).sum() + (p["b"] ** 2).sum() + (p["w"].sum() * p["b"][0])

    params = {
        "w": torch.linspace(-1, 2, 6, dtype=dtype).reshape(2, 3),
        "b": torch.ones(2, dtype=dtype),
    }
    value, grad = sf.value_and_grad(loss)(params)
    transform = CONSTRUCTORS[method](memory_size, form=form)
    assert_update_is_pure(transform, params, grad, steps=3, value=value, value_fn=loss)
    state = transform.init(params)
    for _ in range(3):
        with no_host_sync():
            direction, state = transform.update(grad, state, params)
        params = sf.apply_updates(params, sf.tree.scale(0.1, direction))
        value, grad = sf.value_and_grad(loss)(params)
        assert sf.tree.leaves(direction)[0].dtype == dtype


def test_bad_arguments():
    with pytest.raises(ValueError, match="form"):
        bfgs(form="hessian")
    with pytest.raises(ValueError, match="memory_size"):
        dfp(0)
    with pytest.raises(ValueError, match="damping"):
        bfgs(5, damping=True)
    with pytest.raises(ValueError, match="sr1_rtol"):
        sr1(sr1_rtol=2.0)
    with pytest.raises(ValueError, match="initial_scaling"):
        broyden(initial_scaling=0.0)
    transform = bfgs()
    with pytest.raises(TypeError, match="params"):
        transform.update(torch.zeros(2), transform.init(torch.zeros(2)))
    mixed = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(TypeError, match="one dtype"):
        transform.update(mixed, transform.init(mixed), mixed)


@pytest.mark.parametrize("memory_size", [None, 3])
@pytest.mark.parametrize("method", [*CONSTRUCTORS, "lbfgs"])
def test_a_non_finite_gradient_does_not_poison_the_memory(method, memory_size):
    if method == "lbfgs" and memory_size is None:
        pytest.skip("lbfgs is limited-memory only")
    make = sf.directions.lbfgs if method == "lbfgs" else CONSTRUCTORS[method]
    transform = make(memory_size) if memory_size or method == "lbfgs" else make()
    seq = near_identity_sequence(4, 7, torch.float64, seed=8)
    bad_x, bad_g = seq[3][0], torch.full((4,), float("nan"), dtype=torch.float64)
    state = transform.init(seq[0][0])
    for k, (x, g) in enumerate(seq):
        if k == 3:
            x, g = bad_x, bad_g
        d, state = transform.update(g, state, x)
        if k >= 5:  # two finite gradients after the NaN one: a finite descent direction
            assert torch.isfinite(d).all(), (method, k)
            assert d @ g < 0


@pytest.mark.parametrize("memory_size", [None, 3])
@pytest.mark.parametrize("method", [*CONSTRUCTORS, "lbfgs"])
def test_bfloat16_params(method, memory_size):
    """bfloat16 params: pairs stored in bfloat16, small matrices in float32, directions in
    bfloat16; a separable quadratic is solved to bfloat16 accuracy."""
    if method == "lbfgs" and memory_size is None:
        pytest.skip("lbfgs is limited-memory only")
    make = sf.directions.lbfgs if method == "lbfgs" else CONSTRUCTORS[method]
    transform = make(memory_size) if memory_size or method == "lbfgs" else make()
    weights = torch.arange(1, 6, dtype=torch.bfloat16)

    def loss(p):
        return (weights * (p["a"] - 0.5) ** 2).sum() + ((p["b"] + 1) ** 2).sum()

    params = {
        "a": torch.linspace(-1, 1, 5, dtype=torch.bfloat16),
        "b": torch.ones(3, dtype=torch.bfloat16),
    }
    result = sf.minimize(loss, params, sf.chain(transform, sf.wolfe()), max_steps=30, gtol=2e-2)
    # Solved to bfloat16 accuracy: converged, or stopped by the search at the precision
    # limit. One ulp from 0.5 (2^-8) is a gradient of 2 * 5 * 2^-8 = 0.039 in the heaviest
    # coordinate, above gtol, so the search stopping there is the expected outcome, not a
    # failure; the atol below is about two ulps of 0.5 and of -1.
    stopped_at_precision = result.reason.startswith("search_failed")
    assert result.converged or stopped_at_precision, (method, result.reason)
    assert result.params["a"].dtype == torch.bfloat16
    assert torch.allclose(result.params["a"].float(), torch.full((5,), 0.5), atol=2e-2)
    assert torch.allclose(result.params["b"].float(), torch.full((3,), -1.0), atol=2e-2)


@pytest.mark.parametrize("memory_size", [None, 3])
@pytest.mark.parametrize("method", list(CONSTRUCTORS))
def test_zero_step_pair_is_skipped(method, memory_size):
    """A rejected trust-region step repeats the point: s = y = 0 must leave H unchanged."""
    seq = near_identity_sequence(4, 3, torch.float64, seed=9)
    transform = CONSTRUCTORS[method](memory_size)
    state = transform.init(seq[0][0])
    for x, g in seq:
        d_before, state = transform.update(g, state, x)
    d_again, state = transform.update(seq[-1][1], state, seq[-1][0])
    assert torch.isfinite(d_again).all()
    assert torch.allclose(d_again, d_before, atol=1e-12)


@pytest.mark.parametrize("memory_size", [None, 5])
def test_sr1_without_resets_feeds_a_trust_region(memory_size):
    """chain(sr1(), trust_region()) as users write it: the trust region reads the published
    (possibly indefinite) curvature; Rosenbrock is solved."""
    from benchmarks.problems import UNCONSTRAINED

    problem = UNCONSTRAINED["rosenbrock"]
    transform = sr1(memory_size)
    result = sf.minimize(
        problem.fn, problem.x0.clone(), sf.chain(transform, sf.trust_region()), max_steps=300
    )
    assert result.converged, result.reason
    assert torch.allclose(result.params, torch.ones(2, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("memory_size", [None, 5])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["sr1"])
def test_ascent_gives_minus_g_and_keeps_the_matrix_unless_reset(method, form, memory_size):
    """On the indefinite quadratic A = diag(2, -1) SR1 recovers B = A from exact pairs
    (N&W Theorem 6.1; Broyden shares the code path but has no such property). At x = A^{-1} (0, 1)
    the quasi-Newton direction -A^{-1} g = (0, 1) is an ascent direction: the output is
    -g; by default the matrix (the published curvature) is still A; reset_on_ascent=True,
    from the same state, resets it (curvature v -> v)."""
    a = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(4)]
    probe = torch.tensor([0.3, -0.7], dtype=torch.float64)
    keep = CONSTRUCTORS[method](memory_size, form=form)
    state = keep.init(xs[0])
    for x in xs:
        _, state = keep.update(a @ x, state, x)
    assert torch.allclose(keep.publish(state, x)["curvature"](probe), a @ probe, atol=1e-8)
    x = torch.linalg.solve(a, torch.tensor([0.0, 1.0], dtype=torch.float64))
    g = a @ x
    reset = CONSTRUCTORS[method](memory_size, form=form, reset_on_ascent=True)
    for transform, expected in ((keep, a @ probe), (reset, probe)):
        d, new_state = transform.update(g, state, x)
        assert torch.allclose(d, -g, atol=1e-12), d
        curvature = transform.publish(new_state, x)["curvature"]
        if memory_size is None or transform is reset:
            assert torch.allclose(curvature(probe), expected, atol=1e-8), curvature(probe)
        else:  # the new exact pair is rounding noise in 2-D (the compact form may take it):
            # the kept memory holds every earlier pair, and the same H0 scaling
            old_valid = state.memory.valid[1:]  # the memory shifted by one slot
            assert new_state.memory.valid[:-1][old_valid].all()
            assert torch.equal(new_state.gamma, state.gamma)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["sr1", "broyden"])
def test_second_ascent_after_a_step_along_minus_g_resets_the_dense_matrix(method, form):
    """On A = diag(2, -1), once B = A, x with g = (0, 1) gives an ascent: -g, matrix kept.
    A step along that -g (a line search's) to another ascent point resets the matrix (the
    pair (s, y) is exact, so it changed nothing); a step not along -g keeps it."""
    a = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(4)]
    probe = torch.tensor([0.3, -0.7], dtype=torch.float64)
    transform = CONSTRUCTORS[method](form=form)
    state = transform.init(xs[0])
    for x in xs:
        _, state = transform.update(a @ x, state, x)
    x = torch.linalg.solve(a, torch.tensor([0.0, 1.0], dtype=torch.float64))
    d, state = transform.update(a @ x, state, x)
    assert torch.allclose(d, -(a @ x)) and bool(state.ascent)
    for step, expected in (((0.0, -0.5), probe), ((0.1, -0.5), a @ probe)):
        x_next = x + torch.tensor(step, dtype=torch.float64)
        _, new_state = transform.update(a @ x_next, state, x_next)
        curvature = transform.publish(new_state, x_next)["curvature"]
        if method == "sr1":  # Broyden's B need not equal A: only the reset is checked
            assert torch.allclose(curvature(probe), expected, atol=1e-8), (step, curvature(probe))
        elif step[0] == 0.0:
            assert torch.allclose(curvature(probe), probe, atol=1e-8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sf.directions.lbfgs(3),
        lambda: bfgs(memory_size=3),
        lambda: bfgs(memory_size=3, form="direct"),
        lambda: sr1(memory_size=3),
        lambda: broyden(memory_size=3),
    ],
)
def test_stacked_and_per_slot_memories_agree(make, monkeypatch):
    """Small memories are one stacked tensor, large ones a tuple of slots (a size rule in
    pair_memory): both layouts give the same directions, Gram matrices and curvature
    products, through wrap-around of the memory."""
    from soo_func.directions import pair_memory

    seq = near_identity_sequence(6, 9, torch.float64, seed=4)
    v = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    outputs = {}
    for layout, limit in (("stacked", pair_memory.STACK_MAX_ELEMENTS), ("tuple", 0)):
        monkeypatch.setattr(pair_memory, "STACK_MAX_ELEMENTS", limit)
        transform = make()
        state = transform.init(seq[0][0])
        directions = []
        for x, g in seq:
            d, state = transform.update(g, state, x)
            directions.append(d)
        memory = next(s for s in state if isinstance(s, pair_memory.PairMemory))
        assert isinstance(memory.pairs, torch.Tensor) == (layout == "stacked")
        curvature = transform.publish(state, seq[-1][0])["curvature"](v)
        outputs[layout] = (torch.stack(directions), memory.gram, curvature)
    for stacked, per_slot in zip(outputs["stacked"], outputs["tuple"], strict=True):
        torch.testing.assert_close(stacked, per_slot, rtol=1e-12, atol=1e-12)


def test_bfgs_memory_is_lbfgs_with_the_two_norm_first_step(dtype):
    """One L-BFGS kernel: bfgs(memory_size=m) is lbfgs(m, first_step_norm=2), to the bit."""
    seq = quadratic_sequence(7, 9, dtype, seed=6)
    ours, _ = run(bfgs(memory_size=3), seq)
    reference, _ = run(sf.lbfgs(3, first_step_norm=2), seq)
    torch.testing.assert_close(torch.stack(ours), torch.stack(reference), rtol=0, atol=0)


@pytest.mark.parametrize("memory_size", [None, 5])
def test_sr1_refuses_a_pair_with_a_zero_denominator(memory_size):
    # In 1-D the first pair of a quadratic fits the identity-scaled start exactly
    # (y = B s): s^T (y - B s) = 0, and the update's 0/0 made the published curvature NaN.
    a, b = 3.0, -1.0

    def value_fn(x):
        return 0.5 * a * x[0] ** 2 + b * x[0]

    opt = sf.chain(sf.sr1(memory_size=memory_size), sf.trust_region())
    result = sf.minimize(value_fn, torch.tensor([2.0], dtype=torch.float64), opt, gtol=1e-10)
    assert result.converged, result.reason
    torch.testing.assert_close(result.params, torch.tensor([-b / a], dtype=torch.float64))
    assert all(math.isfinite(row.get("radius", 0.0)) for row in result.history)
