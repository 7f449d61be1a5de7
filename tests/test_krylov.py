"""Krylov solvers against dense linear algebra (torch.linalg.solve, eigen-decompositions)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import soo_func as sf
from soo_func import krylov

SOLVERS = {"cg": krylov.cg, "cr": krylov.cr, "minres": krylov.minres}


def spd_matrix(n: int, seed: int, dtype=torch.float64, cond: float = 100.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((q * eig) @ q.T).to(dtype=dtype, device=device)


def indefinite_matrix(n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.linspace(1, 10, n, dtype=torch.float64) * torch.where(
        torch.arange(n) % 3 == 0, -1.0, 1.0
    )
    return ((q * eig) @ q.T).to(dtype)


def as_tree(vec: torch.Tensor) -> dict:
    """Split a flat vector into a two-leaf pytree (exercises the pytree arithmetic)."""
    return {"a": vec[:3].reshape(3, 1), "b": vec[3:]}


def operator(a: torch.Tensor, calls: list | None = None):
    def matvec(v):
        if calls is not None:
            calls.append(1)
        flat = sf.tree.ravel(v).flat
        return sf.tree.unravel(a @ flat, v)

    return matvec


def flat(x) -> torch.Tensor:
    return sf.tree.ravel(x).flat


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("check_every", [1, 4, None])
def test_solvers_match_dense_solve_on_spd(name, check_every, dtype):
    n = 12
    a = spd_matrix(n, seed=1, dtype=dtype)
    b = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(2))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    res = SOLVERS[name](operator(a), as_tree(b), rtol=tol, max_iters=60, check_every=check_every)
    expected = torch.linalg.solve(a.double(), b.double())
    torch.testing.assert_close(
        flat(res.x).double(), expected, rtol=0, atol=50 * tol * expected.norm()
    )
    assert res.x["a"].dtype == dtype
    assert not bool(res.negative_curvature)
    assert not bool(res.hit_boundary)
    assert res.num_iters.dtype == torch.int64 and res.num_iters.dim() == 0
    true_residual = torch.linalg.norm(b.double() - a.double() @ flat(res.x).double())
    assert float(true_residual) <= 10 * tol * float(b.norm())
    assert float(res.residual_norm) <= tol * float(b.norm()) * 1.0001


@pytest.mark.parametrize("name", ["cr", "minres"])
def test_cr_and_minres_solve_symmetric_indefinite_systems(name):
    n = 15
    a = indefinite_matrix(n, seed=3)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    res = SOLVERS[name](operator(a), as_tree(b), rtol=1e-11, max_iters=200)
    torch.testing.assert_close(flat(res.x), torch.linalg.solve(a, b), rtol=0, atol=1e-8)
    assert bool(res.negative_curvature)


def test_cg_reports_and_stops_on_negative_curvature():
    a = torch.diag(torch.tensor([2.0, 1.0, -1.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    b = torch.ones(6, dtype=torch.float64)
    res = krylov.cg(operator(a), as_tree(b), stop_on_negative_curvature=True)
    assert bool(res.negative_curvature)
    # The iterate returned was reached before the bad direction: a descent direction
    # for the quadratic 0.5 x^T A x - b^T x, i.e. <b, x> > 0.
    assert float(torch.dot(b, flat(res.x))) > 0
    first = krylov.cg(operator(-torch.eye(6, dtype=torch.float64)), as_tree(b),
                      stop_on_negative_curvature=True)  # fmt: skip
    assert int(first.num_iters) == 0 and bool(first.negative_curvature)
    torch.testing.assert_close(flat(first.x), torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("check_every", [1, None])
def test_cg_on_iteration_sees_every_iterate_and_can_stop(check_every):
    """``on_iteration(k, x, r)`` after each iteration: ``r = b - A x`` there; a true result
    stops CG at that iterate (frozen), with the product count of the chosen mode."""
    n = 12
    a = spd_matrix(n, seed=3, cond=1e3)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    seen = []

    def watch(k, x, r):
        seen.append((k, flat(x), flat(r)))
        return torch.tensor(k >= 3)

    calls: list = []
    res = krylov.cg(operator(a, calls), as_tree(b), rtol=0.0, max_iters=8,
                    check_every=check_every, on_iteration=watch)  # fmt: skip
    full = krylov.cg(operator(a), as_tree(b), rtol=0.0, max_iters=3)
    assert int(res.num_iters) == 3
    torch.testing.assert_close(flat(res.x), flat(full.x), rtol=0, atol=0)
    for _, x, r in seen:
        torch.testing.assert_close(r, b - a @ x)
    if check_every is None:  # every iteration runs (frozen after the stop), as its products
        assert [k for k, _, _ in seen] == list(range(1, 9)) and len(calls) == 8
        torch.testing.assert_close(seen[-1][1], flat(res.x), rtol=0, atol=0)
    else:
        assert [k for k, _, _ in seen] == [1, 2, 3] and len(calls) == 3


def test_cg_stops_on_nan_curvature_when_asked():
    b = torch.ones(4, dtype=torch.float64)
    res = krylov.cg(lambda v: sf.tree.scale(float("nan"), v), as_tree(b),
                    stop_on_negative_curvature=True, check_every=None, max_iters=3)  # fmt: skip
    assert bool(res.negative_curvature) and int(res.num_iters) == 0
    torch.testing.assert_close(flat(res.x), torch.zeros(4, dtype=torch.float64))


def test_cr_uses_one_operator_application_per_iteration():
    n = 20
    a = spd_matrix(n, seed=5, cond=1e3)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    calls: list = []
    res = krylov.cr(operator(a, calls), as_tree(b), rtol=1e-8)
    iters = int(res.num_iters)
    assert 3 < iters < 2 * n
    assert len(calls) == iters + 1  # A r0 once, then A r_k once per iteration
    assert int(res.num_matvecs) == len(calls)
    calls.clear()
    with_x0 = krylov.cr(
        operator(a, calls), as_tree(b), x0=as_tree(torch.ones(n, dtype=torch.float64))
    )
    assert len(calls) == int(with_x0.num_iters) + 2 == int(with_x0.num_matvecs)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_x0_and_counts_and_sync_free_mode(name):
    n = 10
    a = spd_matrix(n, seed=7)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    exact = torch.linalg.solve(a, b)
    res = SOLVERS[name](operator(a), as_tree(b), x0=as_tree(exact + 1e-3), rtol=1e-12)
    torch.testing.assert_close(flat(res.x), exact, rtol=0, atol=1e-9)
    calls: list = []
    free = SOLVERS[name](operator(a, calls), as_tree(b), rtol=1e-10, max_iters=40, check_every=None)
    synced = SOLVERS[name](operator(a), as_tree(b), rtol=1e-10, max_iters=40)
    # Frozen iterations leave the converged answer untouched.
    torch.testing.assert_close(flat(free.x), flat(synced.x), rtol=0, atol=1e-12)
    assert int(free.num_iters) == int(synced.num_iters) < 40
    assert int(free.num_matvecs) == len(calls) >= 40


def test_zero_rhs_returns_zero_without_iterating():
    a = spd_matrix(6, seed=9)
    for solve in SOLVERS.values():
        res = solve(operator(a), as_tree(torch.zeros(6, dtype=torch.float64)))
        assert int(res.num_iters) == 0
        assert float(flat(res.x).abs().max()) == 0.0


def test_bad_options_raise():
    a = spd_matrix(6, seed=9)
    b = as_tree(torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="rtol"):
        krylov.cg(operator(a), b, rtol=-1)
    with pytest.raises(ValueError, match="check_every"):
        krylov.cr(operator(a), b, check_every=0)
    with pytest.raises(ValueError, match="radius"):
        krylov.steihaug(operator(a), b, radius=0.0)
    with pytest.raises(ValueError, match="structures differ"):
        krylov.minres(operator(a), b, x0=[torch.ones(6, dtype=torch.float64)])


# ----------------------------------------------------------------------------- Steihaug


def model(a, g, d):
    return float(torch.dot(g, d) + 0.5 * d @ a @ d)


def test_steihaug_inside_equals_newton_solution(dtype):
    n = 12
    a = spd_matrix(n, seed=10, dtype=dtype)
    g = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(11))
    newton = torch.linalg.solve(a.double(), -g.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = krylov.steihaug(operator(a), as_tree(g), radius=10 * float(newton.norm()), rtol=tol)
    assert not bool(res.hit_boundary)
    torch.testing.assert_close(flat(res.x).double(), newton, rtol=0, atol=100 * tol * newton.norm())
    also_cg = krylov.cg(operator(a), as_tree(-g), rtol=tol)
    torch.testing.assert_close(flat(res.x), flat(also_cg.x), rtol=0, atol=100 * tol * newton.norm())


def test_steihaug_stops_at_the_radius():
    n = 12
    a = spd_matrix(n, seed=12)
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    newton_norm = float(torch.linalg.solve(a, -g).norm())
    for radius in (0.05 * newton_norm, 0.5 * newton_norm, 0.99 * newton_norm):
        res = krylov.steihaug(operator(a), as_tree(g), radius=radius, rtol=1e-12)
        assert bool(res.hit_boundary)
        assert float(flat(res.x).norm()) == pytest.approx(radius, rel=1e-10)
        # At least as good as the Cauchy point (N&W Thm 4.5's sufficient reduction).
        gag = float(g @ a @ g)
        tau = min(1.0, float(g.norm()) ** 3 / (radius * gag))
        cauchy = -tau * radius / float(g.norm()) * g
        assert model(a, g, flat(res.x)) <= model(a, g, cauchy) + 1e-12


def test_steihaug_goes_to_the_boundary_on_negative_curvature():
    n = 12
    a = indefinite_matrix(n, seed=14)
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    radius = 1e4  # far beyond every positive-curvature step: only curvature stops it
    res = krylov.steihaug(operator(a), as_tree(g), radius=radius, rtol=1e-12)
    assert bool(res.negative_curvature) and bool(res.hit_boundary)
    d = flat(res.x)
    assert float(d.norm()) == pytest.approx(radius, rel=1e-10)
    assert model(a, g, d) < 0
    # First-iteration negative curvature: -g scaled to the boundary.
    neg = -torch.eye(n, dtype=torch.float64)
    first = krylov.steihaug(operator(neg), as_tree(g), radius=radius)
    torch.testing.assert_close(flat(first.x), -radius * g / g.norm())
    assert int(first.num_iters) == 1 and int(first.num_matvecs) == 1


def test_steihaug_residual_is_true_residual_at_boundary():
    a = spd_matrix(8, seed=16)
    g = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    res = krylov.steihaug(operator(a), as_tree(g), radius=0.1)
    true = torch.linalg.norm(a @ flat(res.x) + g)
    assert float(res.residual_norm) == pytest.approx(float(true), rel=1e-10)


def test_krylov_on_device(device):
    a = spd_matrix(8, seed=18, device=device)
    b = torch.randn(8, dtype=torch.float64, device=device)
    for solve in SOLVERS.values():
        res = solve(operator(a), as_tree(b), rtol=1e-10)
        assert res.x["b"].device.type == device.type
        assert res.num_iters.device.type == device.type
        torch.testing.assert_close(a @ flat(res.x), b, rtol=0, atol=1e-8)
    res = krylov.steihaug(operator(a), as_tree(b), radius=torch.tensor(0.5, device=device))
    assert res.hit_boundary.device.type == device.type


@contextlib.contextmanager
def no_host_sync():
    """Make reading a tensor's value on the host (bool, float, int, item) raise."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_sync_free_mode_reads_nothing_on_the_host(name):
    a = spd_matrix(8, seed=19)
    b = as_tree(torch.ones(8, dtype=torch.float64))
    with no_host_sync():
        res = SOLVERS[name](operator(a), b, max_iters=12, check_every=None)
        krylov.steihaug(operator(a), b, torch.tensor(0.5, dtype=torch.float64), check_every=None)
    torch.testing.assert_close(
        a @ flat(res.x), torch.ones(8, dtype=torch.float64), atol=1e-4, rtol=0
    )
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        SOLVERS[name](operator(a), b, max_iters=12, check_every=1)


@pytest.mark.parametrize("seed", range(4))
def test_steihaug_never_leaves_the_region_and_decreases_the_model(seed):
    n = 10
    a = spd_matrix(n, seed=seed) if seed % 2 else indefinite_matrix(n, seed=seed)
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
    for radius in (1e-3, 0.1, 1.0, 10.0, 1e3):
        res = krylov.steihaug(operator(a), as_tree(g), radius=radius, rtol=1e-10)
        d = flat(res.x)
        assert float(d.norm()) <= radius * (1 + 1e-12)
        assert model(a, g, d) < 0
        assert bool(res.hit_boundary) == (float(d.norm()) >= radius * (1 - 1e-12))


def test_minres_reports_the_true_residual_of_an_inconsistent_singular_system():
    # A = [[1, 1], [1, 1]] is singular; b = [1, -1] is orthogonal to its range, so the
    # least-squares solution is 0 and the residual stays |b| (it was reported as 0).
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    for b, x_ls in (([1.0, -1.0], [0.0, 0.0]), ([1.0, 0.0], [0.5, 0.0])):
        b = torch.tensor(b, dtype=torch.float64)
        result = krylov.minres(lambda v: a @ v, b, rtol=1e-10)
        torch.testing.assert_close(result.x, torch.tensor(x_ls, dtype=torch.float64))
        true_residual = torch.linalg.norm(b - a @ result.x)
        torch.testing.assert_close(result.residual_norm, true_residual)
        assert float(result.residual_norm) > 0.5


@pytest.mark.parametrize("name", ["cg", "cr", "minres"])
def test_a_right_hand_side_near_float32_overflow_is_solved(name):
    # r^T r of b = 3e25 overflows float32 (1e51 > 3.4e38): the solvers work on b / 2^k
    # (exact), so the answer is b / 2 and the residual norm finite.
    b = torch.full((3,), 3e25)
    result = getattr(krylov, name)(lambda v: 2 * v, b)
    torch.testing.assert_close(result.x, b / 2)
    assert torch.isfinite(result.residual_norm)
    assert float(result.residual_norm) <= 1e-5 * float(torch.linalg.norm(b.double()))
