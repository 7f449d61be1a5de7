"""ssbfgs and ssbroyden against independent references: the self-scaled Broyden-class
inverse update written out with explicit matrices, Al-Baali's scalars from an explicit
``B = H^{-1}``, the SSBFGS / SSBroyden2 rules for ``tau`` and ``phi`` written as scalar
Python, the secant condition, BFGS when the scaling is 1, positive definiteness along wolfe
runs, and the scipy BFGS minimum on Moré-Garbow-Hillstrom problems."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch
from helpers import assert_update_is_pure
from test_lbfgs import no_host_sync, quadratic_sequence

import soo_func as sf
from benchmarks.problems import UNCONSTRAINED, scipy_funcs
from soo_func.directions.dense_update import dense_update
from soo_func.directions.self_scaled import self_scaled_parameters, self_scaled_update

D = torch.float64


def random_spd(n: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randn(n, n, generator=gen, dtype=D)
    return q @ q.T / n + 0.3 * torch.eye(n, dtype=D)


def random_pair(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)`` with ``s^T y > 0`` (``y = A s`` for an SPD ``A``, plus noise)."""
    s = torch.randn(n, generator=gen, dtype=D)
    y = random_spd(n, gen) @ s + 0.05 * torch.randn(n, generator=gen, dtype=D)
    assert float(s @ y) > 0
    return s, y


def reference_update(h, s, y, tau, phi) -> np.ndarray:
    """``H+ = (1/tau) [H - H y y^T H / y^T H y + phi (y^T H y) v v^T] + s s^T / s^T y``."""
    h, s, y = (np.asarray(t, dtype=np.float64) for t in (h, s, y))
    hy = h @ y
    yhy, sy = y @ hy, s @ y
    v = s / sy - hy / yhy
    inner = h - np.outer(hy, hy) / yhy + phi * yhy * np.outer(v, v)
    return inner / tau + np.outer(s, s) / sy


def reference_parameters(b: float, h: float, n: int, broyden: bool, first: bool = False):
    """SSBFGS ``tau = min(1, 1/b)``; SSBroyden2 (Urbán et al. eqs. 13-23) as scalar Python."""
    a = max(b * h - 1.0, 0.0)
    if not broyden:
        return (h if first else min(1.0, 1.0 / b)), 1.0
    rho_minus = min(1.0, h * (1.0 - math.sqrt(a / (1.0 + a))))
    theta_minus = (rho_minus - 1.0) / a if a > 0 else -math.inf
    theta = max(theta_minus, min(1.0 / rho_minus, (1.0 - b) / b))
    sigma = 1.0 + a * theta
    phi = (1.0 - theta) / sigma
    if first:
        return h / sigma, phi
    rho_tilde = min(1.0, 1.0 / b)
    power = abs(sigma) ** (1.0 / (1 - n)) if n > 1 else 1.0
    if theta <= 0:
        return min(rho_tilde * power, sigma), phi
    return rho_tilde * min(power, 1.0 / theta), phi


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau,phi", [(1.0, 1.0), (0.4, 1.0), (2.5, 0.0), (0.7, 0.3), (1.3, -0.2)])
def test_update_matches_the_dense_formula_and_the_secant_condition(seed, tau, phi):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    h = random_spd(n, gen)
    s, y = random_pair(n, gen)
    ok = torch.tensor(True)
    got = self_scaled_update(
        h, s, y, h @ y, torch.tensor(tau, dtype=D), torch.tensor(phi, dtype=D), ok
    )
    np.testing.assert_allclose(
        got.numpy(), reference_update(h, s, y, tau, phi), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(got @ y, s, rtol=1e-12, atol=1e-12)  # H+ y = s for every tau, phi
    skipped = self_scaled_update(
        h, s, y, h @ y, torch.tensor(tau, dtype=D), torch.tensor(phi, dtype=D), ~ok
    )
    assert torch.equal(skipped, h)


@pytest.mark.parametrize("tau,phi", [(0.7, 1.0), (1.3, 0.3)])
def test_update_is_exactly_symmetric(tau, phi):
    """Two rank-one corrections add the same product to ``(i, j)`` and ``(j, i)``: the
    update of a symmetric matrix is symmetric bit for bit, at a size where BLAS blocks."""
    gen = torch.Generator().manual_seed(5)
    n = 300
    h = random_spd(n, gen)
    for _ in range(3):
        s, y = random_pair(n, gen)
        tau_, phi_ = torch.tensor(tau, dtype=D), torch.tensor(phi, dtype=D)
        h = self_scaled_update(h, s, y, h @ y, tau_, phi_, torch.tensor(True))
        assert torch.equal(h, h.T)


@pytest.mark.parametrize("seed", range(3))
def test_unit_scaling_is_the_bfgs_and_dfp_updates(seed):
    gen = torch.Generator().manual_seed(seed)
    h = random_spd(6, gen)
    s, y = random_pair(6, gen)
    ok, one = torch.tensor(True), torch.tensor(1.0, dtype=D)
    for phi, method in ((1.0, "bfgs"), (0.0, "dfp")):
        got = self_scaled_update(h, s, y, h @ y, one, torch.tensor(phi, dtype=D), ok)
        want = dense_update(method, "inverse", h, s, y, ok)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


B_H_N = [
    (2.3, 0.8, 10),
    (0.4, 3.0, 10),
    (1.0, 1.0, 5),
    (5.0, 0.9, 1000),
    (0.9, 1.2, 2),
    (1.5, 2.0, 1),
]


@pytest.mark.parametrize("b,h,n", B_H_N)
@pytest.mark.parametrize("broyden", [False, True])
@pytest.mark.parametrize("first", [False, True])
def test_scaling_factors_follow_the_papers_rules(b, h, n, broyden, first):
    want_tau, want_phi = reference_parameters(b, h, n, broyden, first)
    tau, phi, _ = self_scaled_parameters(
        torch.tensor(b, dtype=D), torch.tensor(h, dtype=D), n, torch.tensor(first), broyden
    )
    assert math.isclose(float(tau), want_tau, rel_tol=1e-12)
    assert math.isclose(float(phi), want_phi, rel_tol=1e-12, abs_tol=1e-15)


def test_ssbfgs_scalings():
    b, h, first = torch.tensor(2.5, dtype=D), torch.tensor(0.7, dtype=D), torch.tensor(False)
    for scaling, want in (("al-baali", 0.4), ("oren-luenberger", 0.4), ("none", 1.0)):
        tau, phi, theta = self_scaled_parameters(b, h, 4, first, False, scaling)
        assert math.isclose(float(tau), want) and float(phi) == 1.0 and float(theta) == 0.0
    b = torch.tensor(0.5, dtype=D)  # b < 1: Al-Baali leaves H alone, Oren-Luenberger halves it
    assert float(self_scaled_parameters(b, h, 4, first, False, "al-baali")[0]) == 1.0
    assert float(self_scaled_parameters(b, h, 4, first, False, "oren-luenberger")[0]) == 2.0


def quadratic(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a, rhs = random_spd(n, gen) * 3, torch.randn(n, generator=gen, dtype=D)
    return a, rhs, torch.randn(n, generator=gen, dtype=D)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("make,broyden", [(sf.ssbfgs, False), (sf.ssbroyden, True)])
@pytest.mark.parametrize("initial_scaling", [1.0, None])
def test_transform_matches_dense_algebra_along_line_search_steps(
    seed, make, broyden, initial_scaling
):
    """Steps ``s = alpha d`` along each direction; every matrix is checked against the
    dense formula with ``b = s^T B s / s^T y`` from ``B = inv(H)``."""
    n = 6
    a, rhs, x = quadratic(n, seed)
    transform = make(initial_scaling=initial_scaling)
    state = transform.init(x)
    d, state = transform.update(a @ x - rhs, state, x)
    for k, alpha in enumerate([0.3, 0.8, 1.0, 0.55, 1.4]):
        h_old, x_old = state.matrix.clone(), x
        x = x + alpha * d
        s, y = x - x_old, a @ (x - x_old)
        sy = float(s @ y)
        b = float(s @ torch.linalg.solve(h_old, s)) / sy
        hh = float(y @ h_old @ y) / sy
        first = initial_scaling is None and k == 0
        tau, phi = reference_parameters(b, hh, n, broyden, first)
        d, state = transform.update(a @ x - rhs, state, x)
        want = reference_update(h_old, s, y, tau, phi)
        np.testing.assert_allclose(state.matrix.numpy(), want, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(d, -(state.matrix @ (a @ x - rhs)))
        torch.testing.assert_close(state.matrix @ y, s, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("initial_scaling", [None, 1.0, 0.25])
def test_unscaled_ssbfgs_is_bfgs(initial_scaling):
    seq = quadratic_sequence(6, 8, D, seed=3)
    ours = sf.ssbfgs(scaling="none", initial_scaling=initial_scaling)
    theirs = sf.bfgs(initial_scaling=initial_scaling)
    s_ours, s_theirs = ours.init(seq[0][0]), theirs.init(seq[0][0])
    for x, g in seq:
        d_ours, s_ours = ours.update(g, s_ours, x)
        d_theirs, s_theirs = theirs.update(g, s_theirs, x)
        torch.testing.assert_close(d_ours, d_theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s_ours.matrix, s_theirs.matrix, rtol=1e-10, atol=1e-12)
        if initial_scaling is None:  # (fixed H0: ours starts at min(1, 1/|g|), bfgs at 1)
            assert torch.equal(s_ours.step_hint, s_theirs.step_hint)


def drive(optimizer: sf.Transform, fn, x: torch.Tensor, steps: int):
    """``steps`` updates of ``optimizer`` from ``x``; the direction's matrices along the way."""
    state, matrices = optimizer.init(x), []
    for _ in range(steps):
        value, grad = sf.value_and_grad(fn)(x)
        updates, state = optimizer.update(grad, state, x, value=value, grad=grad, value_fn=fn)
        x = sf.apply_updates(x, updates)
        matrices.append(state.states[0].matrix)
    return x, matrices


@pytest.mark.parametrize("make", [sf.ssbfgs, sf.ssbroyden])
@pytest.mark.parametrize("problem", ["extended_rosenbrock", "wood", "helical_valley"])
def test_matrix_stays_symmetric_positive_definite_along_wolfe(make, problem):
    p = UNCONSTRAINED[problem]
    _, matrices = drive(sf.chain(make(), sf.wolfe()), p.fn, p.x0.clone(), 40)
    for m in matrices:
        assert torch.isfinite(m).all()
        assert float((m - m.T).abs().max()) <= 1e-14 * float(m.abs().max())
        assert float(torch.linalg.eigvalsh(0.5 * (m + m.T)).min()) > 0


SOLVED = ["rosenbrock", "helical_valley", "wood", "extended_rosenbrock", "beale", "trigonometric"]


def scipy_bfgs_value(problem) -> float:
    fun, jac = scipy_funcs(problem)[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = so.minimize(
            fun, problem.x0.numpy(), jac=jac, method="BFGS", options={"gtol": 1e-5}
        )
    assert float(np.abs(jac(result.x)).max()) <= 1e-5
    return float(result.fun)


@pytest.mark.parametrize("name", SOLVED)
@pytest.mark.parametrize(
    "make",
    [
        lambda: sf.chain(sf.ssbfgs(), sf.wolfe()),
        lambda: sf.chain(sf.ssbroyden(), sf.wolfe()),
        lambda: sf.chain(sf.ssbfgs(initial_scaling=None), sf.wolfe()),
        lambda: sf.chain(sf.ssbroyden(initial_scaling=None), sf.wolfe()),
        lambda: sf.chain(sf.ssbfgs(scaling="oren-luenberger"), sf.wolfe()),
        lambda: sf.chain(sf.ssbfgs(), sf.armijo()),
        lambda: sf.chain(sf.ssbroyden(), sf.trust_region()),
    ],
    ids=[
        "ssbfgs+wolfe",
        "ssbroyden+wolfe",
        "ssbfgs0+wolfe",
        "ssbroyden0+wolfe",
        "ol+wolfe",
        "ssbfgs+armijo",
        "ssbroyden+trust_region",
    ],
)
def test_reaches_the_scipy_bfgs_minimum(name, make):
    p = UNCONSTRAINED[name]
    result = sf.minimize(p.fn, p.x0.clone(), make(), max_steps=3000, gtol=1e-5)
    assert float(sf.tree.norm(result.grad, math.inf)) <= 1e-5, result.reason
    assert math.isclose(float(result.value), scipy_bfgs_value(p), rel_tol=1e-6, abs_tol=1e-5)


def test_one_parameter_and_float32():
    result = sf.minimize(
        lambda x: (x - 3.0).pow(4).sum() + (x - 3.0).pow(2).sum(),
        torch.zeros(1, dtype=D),
        sf.chain(sf.ssbroyden(), sf.wolfe()),
        gtol=1e-8,
    )
    assert abs(float(result.params[0]) - 3.0) < 1e-6
    a, rhs, x = quadratic(5, 0)
    a, rhs, x = a.float(), rhs.float(), x.float()
    result = sf.minimize(
        lambda x: 0.5 * x @ a @ x - rhs @ x, x, sf.chain(sf.ssbfgs(), sf.wolfe()), gtol=1e-4
    )
    torch.testing.assert_close(result.params, torch.linalg.solve(a, rhs), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("make", [sf.ssbfgs, sf.ssbroyden])
def test_update_is_pure_and_host_sync_free(make):
    a, rhs, x = quadratic(5, 1)

    def loss(p):
        return 0.5 * p @ a @ p - rhs @ p

    value, grad = sf.value_and_grad(loss)(x)
    transform = sf.chain(make(), sf.armijo_sync_free())
    assert_update_is_pure(transform, x, grad, steps=3, value=value, value_fn=loss)
    state = transform.init(x)
    with no_host_sync():
        transform.update(grad, state, x, value=value, grad=grad, value_fn=loss)


def test_rejected_pair_kept_matrix_and_ascent_reset():
    a, rhs, x = quadratic(4, 2)
    transform = sf.ssbroyden()
    state = transform.init(x)
    d, state = transform.update(a @ x - rhs, state, x)
    for _ in range(2):
        x = x + 0.5 * d
        d, state = transform.update(a @ x - rhs, state, x)
    before, g_old = state.matrix.clone(), a @ x - rhs
    assert not torch.allclose(before, torch.eye(4, dtype=D))
    # s^T y < 0: the pair is skipped, the matrix kept (and the direction is -H g)
    s = 0.5 * d
    d, state = transform.update(g_old - 0.1 * s, state, x + s)
    assert torch.equal(state.matrix, before) and not bool(state.ascent)
    torch.testing.assert_close(d, -(before @ (g_old - 0.1 * s)))
    # a non-finite gradient resets to H0 = I and returns -g
    _, state = transform.update(torch.full((4,), math.nan, dtype=D), state, x)
    assert torch.equal(state.matrix, torch.eye(4, dtype=D)) and bool(state.ascent)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scaling"):
        sf.ssbfgs(scaling="oren")
    with pytest.raises(ValueError, match="initial_scaling"):
        sf.ssbroyden(initial_scaling=0.0)
    with pytest.raises(TypeError, match="ssbfgs needs params"):
        t = sf.ssbfgs()
        x = torch.zeros(2, dtype=D)
        t.update(x, t.init(x))
