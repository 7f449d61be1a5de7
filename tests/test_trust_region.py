"""trust_region: ratios and radius sequences on hand-made quadratics, the dogleg path
against an independent formula, rejection, purity, dtypes and errors.

The direction used here is a local, dense "model Newton" transform: it outputs
``-B^{-1} g`` and publishes ``curvature = v -> B v`` for a chosen matrix ``B``, so the
model and therefore ``rho`` are known in closed form.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import assert_update_is_pure

import soo_func as sf
from soo_func.base import update_and_publish
from soo_func.krylov import steihaug
from soo_func.searches.acceptance import rounding_safe_ratio
from soo_func.searches.trust_region import dogleg_step, steihaug_rtol, trust_region

A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
B_VEC = torch.tensor([1.0, -2.0], dtype=torch.float64)


class _Empty(NamedTuple):
    pass


def model_newton(B: torch.Tensor) -> sf.Transform:
    """Direction ``-B^{-1} g`` with the published model curvature ``B``."""

    def init(params):
        return _Empty()

    def update(updates, state, params=None, **extra):
        return torch.linalg.solve(B.to(updates.dtype), -updates), state

    def publish(state, params=None, **extra):
        return {"curvature": lambda v: B.to(v.dtype) @ v}

    return sf.Transform(init, update, publish)


def quadratic(x):
    """f(x) = 0.5 x^T A x - b^T x: a Newton model with B = theta A gives rho = 2 - 1/theta."""
    a, b = A.to(x.dtype), B_VEC.to(x.dtype)
    return 0.5 * x @ (a @ x) - b @ x


def _step(opt, state, x):
    value, grad = sf.value_and_grad(quadratic)(x)
    extra = {"value": value, "grad": grad, "value_fn": quadratic}
    updates, state = opt.update(grad, state, x, **extra)
    return updates, state, value, grad


@pytest.mark.parametrize("solver", ["dogleg", "steihaug"])
@pytest.mark.parametrize(
    ("theta", "rho"), [(1.0, 1.0), (2.0, 1.5), (2 / 3, 0.5), (0.4, -0.5), (1 / 1.9, 0.1)]
)
def test_ratio_is_the_chosen_one_and_radius_follows_the_rule(solver, theta, rho):
    """Radius 10 holds the Newton point: rho = 2 - 1/theta exactly, and the radius is
    kept (interior step) unless rho < 1/4, where it becomes |p| / 4."""
    opt = sf.chain(model_newton(theta * A), trust_region(solver=solver, initial_radius=10.0))
    x = torch.tensor([2.0, 1.0], dtype=torch.float64)
    state = opt.init(x)
    updates, state, value, grad = _step(opt, state, x)
    tr = state.states[1]
    newton = torch.linalg.solve(theta * A, -grad)
    assert float(tr.ratio) == pytest.approx(rho, rel=1e-9)
    accepted = rho > 1e-4
    assert bool(tr.step_accepted) == accepted
    if accepted:
        assert torch.allclose(updates, newton, rtol=1e-10)
        assert torch.allclose(tr.next_value, quadratic(x + newton), rtol=1e-12)
    else:
        assert torch.equal(updates, torch.zeros_like(x))
        assert tr.next_value == value and torch.equal(tr.next_grad, grad)
    expected_radius = 0.25 * float(newton.norm()) if rho < 0.25 else 10.0
    assert float(tr.radius) == pytest.approx(expected_radius, rel=1e-12)
    assert not bool(tr.search_failed)


def test_radius_sequence_grows_on_the_boundary_and_caps():
    """Exact model (rho = 1) with the Newton point far outside: every step ends on the
    boundary, so the radius doubles each time up to max_radius."""
    opt = sf.chain(
        model_newton(A), trust_region(solver="dogleg", initial_radius=0.01, max_radius=0.05)
    )
    x = torch.tensor([30.0, -40.0], dtype=torch.float64)
    state = opt.init(x)
    radii = []
    for _ in range(4):
        updates, state, _, _ = _step(opt, state, x)
        tr = state.states[1]
        assert float(tr.ratio) == pytest.approx(1.0, rel=1e-9)
        assert float(updates.norm()) == pytest.approx(radii[-1] if radii else 0.01, rel=1e-9)
        radii.append(float(tr.radius))
        x = x + updates
    assert radii == pytest.approx([0.02, 0.04, 0.05, 0.05])


def test_rejected_steps_shrink_until_accepted_and_params_stay():
    """A model four times too flat (theta = 1/4, rho = -2 for the Newton point): the
    first steps are rejected, params stay, the radius shrinks; then a short step whose
    model is good enough is accepted."""
    opt = sf.chain(model_newton(0.25 * A), trust_region(solver="dogleg", initial_radius=100.0))
    x0 = torch.tensor([2.0, 1.0], dtype=torch.float64)
    x, state = x0, opt.init(x0)
    history = []
    for _ in range(6):
        updates, state, value, _grad = _step(opt, state, x)
        tr = state.states[1]
        history.append((bool(tr.step_accepted), float(tr.radius), float(tr.ratio)))
        if not bool(tr.step_accepted):
            assert torch.equal(updates, torch.zeros_like(x))
            assert tr.next_value == value
        x = sf.apply_updates(x, updates)
    assert not history[0][0] and history[0][2] == pytest.approx(-2.0)
    assert any(accepted for accepted, _, _ in history)
    first_accept = next(i for i, h in enumerate(history) if h[0])
    assert torch.equal(x0, torch.tensor([2.0, 1.0], dtype=torch.float64))
    radii = [r for _, r, _ in history[:first_accept]]
    assert all(b < a for a, b in itertools.pairwise(radii))


def _dogleg_reference(g, B, pb, radius):
    """N&W eq. (4.16) with the book's tau in [0, 2], solved independently with numpy."""
    pu = -(g @ g) / (g @ B @ g) * g
    if np.linalg.norm(pb) <= radius:
        return pb
    if np.linalg.norm(pu) >= radius:
        return radius * pu / np.linalg.norm(pu)
    w = pb - pu
    roots = np.roots([w @ w, 2 * pu @ w, pu @ pu - radius**2])
    t = max(r.real for r in roots)
    return pu + t * w


@pytest.mark.parametrize("radius", [0.05, 0.3, 0.6, 1.0, 5.0])
def test_dogleg_matches_the_book(radius):
    B = np.array([[4.0, 1.0], [1.0, 1.5]])
    g = np.array([1.0, -0.7])
    pb = -np.linalg.solve(B, g)
    expected = _dogleg_reference(g, B, pb, radius)
    Bt = torch.from_numpy(B)
    step, _ = dogleg_step(
        torch.from_numpy(g),
        torch.from_numpy(pb),
        lambda v: Bt @ v,
        torch.tensor(radius, dtype=torch.float64),
    )
    np.testing.assert_allclose(step.numpy(), expected, rtol=1e-10, atol=1e-14)
    assert float(step.norm()) <= radius * (1 + 1e-12)


def test_dogleg_negative_curvature_takes_steepest_descent_to_boundary():
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    B = torch.tensor([[-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    step, _ = dogleg_step(g, -g, lambda v: B @ v, torch.tensor(0.5, dtype=torch.float64))
    assert torch.allclose(step, -0.5 * g / g.norm())


@pytest.mark.parametrize("solver", ["dogleg", "steihaug"])
def test_update_is_pure(solver, dtype):
    opt = sf.chain(model_newton(A), trust_region(solver=solver, initial_radius=0.5))
    x = torch.tensor([2.0, 1.0], dtype=dtype)
    value, grad = sf.value_and_grad(quadratic)(x)
    updates, state = assert_update_is_pure(opt, x, grad, steps=3, value=value, value_fn=quadratic)
    assert updates.dtype == dtype and state.states[1].radius.dtype == dtype


@pytest.mark.parametrize("solver", ["dogleg", "steihaug"])
def test_minimize_rosenbrock_with_exact_newton(solver, dtype):
    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    class Newton(NamedTuple):
        pass

    def newton():
        def update(updates, state, params=None, **extra):
            H = torch.func.hessian(rosenbrock)(params)
            evals, evecs = torch.linalg.eigh(H)
            inv = evecs @ torch.diag(1 / evals.abs().clamp(min=1e-8)) @ evecs.T
            return -(inv @ updates), state

        def publish(state, params=None, **extra):
            H = torch.func.hessian(rosenbrock)(params)
            return {"curvature": lambda v: H @ v}

        return sf.Transform(lambda p: Newton(), update, publish)

    x0 = torch.tensor([-1.2, 1.0], dtype=dtype)
    result = sf.minimize(
        rosenbrock,
        x0,
        sf.chain(newton(), trust_region(solver=solver)),
        gtol=1e-4 if dtype == torch.float32 else 1e-8,
        max_steps=200,
    )
    assert result.converged, result.reason
    assert torch.allclose(
        result.params, torch.ones(2, dtype=dtype), atol=1e-3 if dtype == torch.float32 else 1e-7
    )
    # one value_and_grad per step (the driver reuses the trial point) plus the start
    assert result.num_grad_evals == result.num_steps + 1
    assert "radius" in result.history[-1] and "ratio" in result.history[-1]


def test_collapsed_radius_reports_failure():
    """An objective that is NaN everywhere but at the start: every trial is rejected
    (rho = -inf), the radius shrinks by 1/4 each time, and once it is below min_radius
    search_failed is published and minimize stops at the start with a finite value."""
    x0 = torch.tensor([2.0, 1.0], dtype=torch.float64)

    def spiky(x):
        return quadratic(x) + torch.where((x == x0).all(), 0.0, torch.nan)

    opt = sf.chain(model_newton(A), trust_region(solver="dogleg", min_radius=1e-3))
    result = sf.minimize(spiky, x0, opt, max_steps=100)
    assert result.reason.startswith("search_failed")
    assert torch.equal(result.params, x0) and torch.isfinite(result.value)
    radii = [row["radius"] for row in result.history[1:]]
    newton_norm = float(torch.linalg.solve(A, -sf.value_and_grad(quadratic)(x0)[1]).norm())
    expected = [0.25 * min(newton_norm, 1.0)]
    while expected[-1] >= 1e-3:
        expected.append(0.25 * expected[-1])
    assert radii == pytest.approx(expected, rel=1e-12)
    assert all(row["step_accepted"] == 0.0 for row in result.history[1:])


def test_errors():
    with pytest.raises(ValueError, match="solver"):
        trust_region(solver="exact")
    with pytest.raises(ValueError, match="initial_radius"):
        trust_region(initial_radius=2.0, max_radius=1.0)
    with pytest.raises(ValueError, match="shrink_below"):
        trust_region(shrink_below=0.8, grow_above=0.5)
    with pytest.raises(ValueError, match="grow_factor"):
        trust_region(grow_factor=1.0)
    with pytest.raises(ValueError, match="accept_ratio"):
        trust_region(accept_ratio=1.0)
    tr = trust_region()
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="newton_krylov"):
        tr.update(x, tr.init(x), x, value=quadratic(x), grad=x, value_fn=quadratic)
    with pytest.raises(TypeError, match="newton_krylov"):
        sf.minimize(quadratic, x, sf.chain(sf.scale(-1.0), trust_region()))


def test_radius_does_not_collapse_at_the_rounding_floor():
    """f = 1.35 + 0.5 |x|^2 at |x| ~ 1e-9: the predicted decrease (~1e-18) is below the
    rounding of f (~3e-16), so rho is noise; the radius must not shrink to nothing."""
    value = torch.tensor(1.35, dtype=torch.float64)
    ratio = rounding_safe_ratio(value, value, torch.tensor(1e-18, dtype=torch.float64))
    assert float(ratio) == 1.0
    # far from the floor the ratio is the plain one (and a rise is still rejected)
    plain = rounding_safe_ratio(value, value - 0.5, torch.tensor(1.0, dtype=torch.float64))
    assert float(plain) == 0.5
    rise = rounding_safe_ratio(value, value + 1e-15, torch.tensor(1e-18, dtype=torch.float64))
    assert float(rise) < 0

    def fn(p):
        return 1.35 + 0.5 * (p["x"] ** 2).sum()

    hessian = torch.eye(2, dtype=torch.float64)

    def curvature_direction():
        def init(params):
            return sf.EmptyState()

        def update(updates, state, params=None, **extra):
            return sf.tree.neg(updates), state

        def publish(state, params, **extra):
            return {"curvature": lambda v: {"x": hessian @ v["x"]}}

        return sf.Transform(init, update, publish)

    opt = sf.chain(curvature_direction(), sf.trust_region(initial_radius=1.0))
    params = {"x": torch.tensor([1e-9, -2e-9], dtype=torch.float64)}
    state = opt.init(params)
    for _ in range(5):
        value, grad = sf.value_and_grad(fn)(params)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fn)
        params = sf.apply_updates(params, updates)
    radius = sf.publish(opt, state, params, value=value, grad=grad, value_fn=fn)["radius"]
    assert float(radius) >= 1.0


def nan_model_direction() -> sf.Transform:
    """A direction whose published curvature is NaN (as SR1's compact matrix is after a
    pair with a zero denominator ``(y - B s)^T s = 0``): the direction itself is -g."""

    def init(params):
        return _Empty()

    def update(updates, state, params=None, **extra):
        return -updates, state

    def publish(state, params=None, **extra):
        return {"curvature": lambda v: torch.full_like(v, torch.nan)}

    return sf.Transform(init, update, publish)


@pytest.mark.parametrize("solver", ["steihaug", "dogleg"])
def test_a_nan_model_never_makes_the_radius_nan(solver):
    """Issue 16 item 9: a NaN model gave a NaN step, hence radius = 0.25 min(NaN, r) = NaN,
    which no min_radius test catches (the run spun). The radius stays finite and positive,
    and the step is judged on the linear model, so the run still moves downhill."""
    opt = sf.chain(nan_model_direction(), trust_region(solver=solver))
    x = torch.tensor([2.0, 1.0], dtype=torch.float64)
    state = opt.init(x)
    for _ in range(6):
        updates, state, value, _ = _step(opt, state, x)
        tr = state.states[1]
        assert torch.isfinite(tr.radius) and float(tr.radius) > 0
        assert all(torch.isfinite(u) for u in updates)
        x = x + updates
    assert float(quadratic(x)) < float(value) or bool(tr.step_accepted)


def test_radius_update_is_finite_and_positive_on_bad_steps():
    from soo_func.searches.acceptance import radius_update

    rule = dict(shrink_below=0.25, grow_above=0.75, shrink_factor=0.25, grow_factor=2.0)
    radius = torch.tensor(2.0, dtype=torch.float64)
    for norm in (torch.nan, torch.inf, 0.0):
        for ratio in (-torch.inf, torch.nan, 0.1):
            new = radius_update(
                radius, torch.tensor(ratio), torch.tensor(norm), max_radius=10.0, **rule
            )
            assert float(new) == 0.5, (norm, ratio)


def test_sr1_trust_region_on_the_issue_quadratic_stops_honestly():
    """Issue 16 item 9's reproducer family: ``sr1(memory_size=5)`` + ``trust_region`` on
    1-D quadratics ``0.5 a x^2 + b x``. No radius is NaN or negative, and every run stops
    on the gradient test (the upstream SR1 matrix is NaN after its first, degenerate pair
    in 1-D: ``y = B0 s`` exactly)."""
    cases = [
        (52127.24, -0.29343, -2.17879),
        (0.007742301898688491, -2.150786995022341, -1.0188166884120087),
        (31959.492578560028, -0.20292040312320642, -1.8324542659060088),
        (8.082514996479407, 0.995301683348794, 2.799638206624553),
    ]
    for a, b, x0 in cases:

        def fn(p, a=a, b=b):
            return 0.5 * a * p["x"][0] ** 2 + b * p["x"][0]

        params = {"x": torch.tensor([x0], dtype=torch.float64)}
        opt = sf.chain(sf.sr1(memory_size=5), trust_region())
        result = sf.minimize(fn, params, opt, max_steps=200)
        radii = torch.tensor([row["radius"] for row in result.history[1:]])
        assert bool(torch.isfinite(radii).all() and (radii > 0).all()), (a, b, x0)
        assert result.reason == "gtol", (a, b, x0, result.reason)
        # 1-D: |x - x*| = |g| / a exactly (up to rounding)
        error = abs(float(result.params["x"][0]) + b / a)
        assert error <= 1.01 * float(result.grad_norm) / a + 1e-12, (a, b, x0)


def test_chain_skips_the_direction_solve_before_steihaug():
    """``trust_region`` (Steihaug) solves the model itself (``solves_model``): ``chain``
    tells ``newton_krylov`` ``model_only``, which then makes no Krylov solve (0 iterations,
    ``direction_skipped``), and the step is Steihaug-CG's from zero on the Hessian with the
    N&W (7.3) tolerance (checked against a direct call). With dogleg, which needs the
    Newton step, the direction solves as before."""
    hessian = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=torch.float64)

    def value_fn(p):
        return 0.5 * p["x"] @ hessian @ p["x"] - p["x"].sum()

    params = {"x": torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64)}
    grad = {"x": hessian @ params["x"] - 1.0}
    extra = {"value": value_fn(params), "grad": grad, "value_fn": value_fn}
    opt = sf.chain(sf.newton_krylov(), sf.trust_region(initial_radius=0.5))
    assert opt.solves_model and not sf.chain(sf.newton_krylov()).solves_model
    updates, _, published = update_and_publish(opt, grad, opt.init(params), params, **extra)
    assert published["direction_skipped"] is True
    assert int(published["newton_krylov_iters"]) == 0
    expected = steihaug(
        lambda v: {"x": hessian @ v["x"]},
        grad,
        torch.tensor(0.5, dtype=torch.float64),
        rtol=steihaug_rtol(torch.linalg.vector_norm(grad["x"])),
    )
    assert torch.allclose(updates["x"], expected.x["x"], rtol=1e-12, atol=1e-14)
    dogleg = sf.chain(sf.newton_krylov(), sf.trust_region(solver="dogleg"))
    assert not dogleg.solves_model
    _, _, published = update_and_publish(dogleg, grad, dogleg.init(params), params, **extra)
    assert "direction_skipped" not in published and int(published["newton_krylov_iters"]) > 0
