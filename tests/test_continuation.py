"""Tests of soo_func.continuation (the minimizer path) and soo_func.drivers.continuation_path:
closed-form paths, the tangent, the stage logic, the driver contract (history, converged_ok),
the params_offset chain extension, purity."""

from __future__ import annotations

import itertools
import math

import pytest
import scipy.optimize
import torch
from helpers import assert_update_is_pure

import soo_func as sf
from soo_func.base import EmptyState, Transform
from soo_func.continuation import homotopy, path_tangent, reset_at_stage_change
from soo_func.drivers import continuation_path


def dense_newton() -> Transform:
    """Exact Newton on the ``value_fn`` extra (a dense Hessian): an independent corrector."""

    def update(updates, state, params=None, **extra):
        fn = extra["value_fn"]
        raw = fn.fn if isinstance(fn, sf.CountedObjective) else fn
        hessian = torch.func.hessian(raw)(params)
        return -torch.linalg.solve(hessian, updates), state

    return Transform(lambda p: EmptyState(), update)


def quadratic(n: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = (m @ m.T + n * torch.eye(n, dtype=torch.float64)).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    x0 = (10 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    return a, b, x0


def tracked_path(value_fn, x0, optimizer, **kwargs):
    """``[(t, x(t))]``: the path points the homotopy accepted, read from the driver."""
    points, previous = [], {"x": x0, "stage": 0}

    def record(row, params):
        if row["continuation_stage"] > previous["stage"] and row["continuation_t_path"] < 1:
            points.append((row["continuation_t_path"], previous["x"]))
            previous["stage"] = row["continuation_stage"]
        previous["x"] = params

    result = sf.minimize(value_fn, x0, optimizer, callback=record, **kwargs)
    return points, result


def tolerance(dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-3


@pytest.mark.parametrize("schedule", ["linear", "exponential"])
def test_keller_path_on_a_quadratic_is_the_segment_to_the_minimizer(dtype, schedule):
    # grad f(x) = (1 - t) grad f(x0) with f = x^T A x / 2 - b^T x gives
    # A x - b = (1 - t)(A x0 - b), i.e. x(t) = (1 - t) x0 + t A^{-1} b.
    a, b, x0 = quadratic(5, dtype)
    opt = sf.chain(homotopy("keller", schedule=schedule, corrector_rtol=1e-6), dense_newton())
    points, result = tracked_path(lambda x: 0.5 * x @ a @ x - b @ x, x0, opt, gtol=1e-4)
    x_star = torch.linalg.solve(a.double(), b.double())
    assert len(points) >= 3 and result.converged
    assert [t for t, _ in points] == sorted(t for t, _ in points)
    for t, x in points:
        expected = (1 - t) * x0.double() + t * x_star
        torch.testing.assert_close(
            x.double(), expected, rtol=tolerance(dtype), atol=tolerance(dtype) * 10
        )
    assert result.history[-1]["continuation_t"] == 1.0


@pytest.mark.parametrize("anchor_curvature", [None, 3.0])
def test_convex_path_on_a_quadratic_solves_the_shifted_system(dtype, anchor_curvature):
    # t (A x - b) + (1 - t) s (x - x0) = 0  =>  (t A + (1 - t) s I) x = t b + (1 - t) s x0.
    a, b, x0 = quadratic(4, dtype, seed=1)
    opt = sf.chain(
        homotopy("convex", anchor_curvature=anchor_curvature, corrector_rtol=1e-7),
        dense_newton(),
        sf.armijo(),
    )
    value_fn = lambda x: 0.5 * x @ a @ x - b @ x  # noqa: E731
    points, result = tracked_path(value_fn, x0, opt, gtol=1e-4)
    g0 = a.double() @ x0.double() - b.double()
    s = (
        anchor_curvature
        if anchor_curvature is not None
        else float(g0.norm() / max(float(x0.double().norm()), 1.0))
    )
    eye = torch.eye(4, dtype=torch.float64)
    assert len(points) >= 3 and result.converged
    for t, x in points:
        expected = torch.linalg.solve(
            t * a.double() + (1 - t) * s * eye, t * b.double() + (1 - t) * s * x0.double()
        )
        torch.testing.assert_close(
            x.double(), expected, rtol=tolerance(dtype), atol=tolerance(dtype) * 10
        )


def test_user_family_regularization_path_and_fixed_schedule(dtype):
    # f_t = x^T A x / 2 - b^T x + (1 - t) lam |x|^2 / 2: x(t) = (A + (1 - t) lam I)^{-1} b.
    a, b, x0 = quadratic(3, dtype, seed=2)
    lam = 50.0

    def family(x, t):
        return 0.5 * x @ a @ x - b @ x + (1 - t) * lam * 0.5 * (x @ x)

    schedule = [0.0, 0.3, 0.6, 0.9, 1.0]
    opt = sf.chain(homotopy(family, schedule=schedule, corrector_rtol=1e-7), dense_newton())
    points, result = tracked_path(lambda x: family(x, 1.0), x0, opt, gtol=1e-4)
    assert [round(t, 5) for t, _ in points] == schedule[:-1]
    eye = torch.eye(3, dtype=torch.float64)
    for t, x in [*points, (1.0, result.params)]:
        expected = torch.linalg.solve(a.double() + (1 - t) * lam * eye, b.double())
        torch.testing.assert_close(
            x.double(), expected, rtol=tolerance(dtype), atol=tolerance(dtype) * 10
        )


def test_path_tangent_matches_the_dense_implicit_function_formula(dtype):
    # dx/dt = -H_t^{-1} d/dt grad f_t, with H_t and d/dt grad f_t from dense autodiff.
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(dtype)

    def family(x, t):
        return (
            torch.logsumexp(w.to(x.dtype) @ x, 0)
            + 0.5 * (1 + t) * (x @ x)
            + t**2 * x.sum()
            + torch.sin(t * x[0])
        )

    x = torch.randn(4, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.tensor(0.3, dtype=dtype)
    tangent = path_tangent(family, x, t, rtol=1e-10)
    xd, td = x.double(), t.double()
    hessian = torch.func.hessian(family)(xd, td)
    mixed = torch.func.jacfwd(torch.func.grad(family), argnums=1)(xd, td)
    expected = -torch.linalg.solve(hessian, mixed)
    torch.testing.assert_close(
        tangent.double(), expected, rtol=tolerance(dtype) * 10, atol=tolerance(dtype)
    )


def test_tangent_counts_hessian_products_on_a_counted_family():
    counted = sf.CountedObjective(lambda x, t: 0.5 * (1 + t) * (x @ x) - t * x.sum())
    tangent = path_tangent(counted, torch.ones(3, dtype=torch.float64), torch.tensor(0.0))
    # H = I, d/dt grad = x - 1 = 0 at x = 1: the tangent is zero.
    torch.testing.assert_close(tangent, torch.zeros(3, dtype=torch.float64))
    assert counted.num_hvp_evals >= 1


def test_driver_does_not_converge_before_t_reaches_one():
    # gtol is loose enough that |grad f| passes it long before t = 1; the driver must wait.
    a, b, x0 = quadratic(3, torch.float64, seed=4)
    value_fn = lambda x: 0.5 * x @ a @ x - b @ x  # noqa: E731
    g0 = float((a @ x0 - b).abs().max())
    opt = sf.chain(homotopy("keller", stage_step=0.01, max_step=0.01), dense_newton())
    result = sf.minimize(value_fn, x0, opt, gtol=0.9 * g0, max_steps=500)
    ts = [row["continuation_t"] for row in result.history[1:]]
    assert result.converged and ts[-1] == 1.0
    assert ts == sorted(ts) and len(ts) > 50  # every stage ran: no early stop at t < 1
    assert all(row["converged_ok"] == (row["continuation_t"] >= 1.0) for row in result.history[1:])
    grads = [row["grad_norm"] for row in result.history]
    assert any(g < 0.9 * g0 for g in grads[1:-1])  # the plain gtol test would have stopped earlier


def test_retry_from_the_path_point_and_abandon():
    # A corrector too weak to converge within max_corrector_steps makes every stage fail:
    # the step shrinks, each retry starts from the last path point, and below min_step the
    # homotopy gives up and hands f itself to the corrector.
    # (Not a quadratic: there the tangent predictor is exact and no stage ever fails.)
    x0 = torch.tensor([5.0, -4.0, 3.0], dtype=torch.float64)
    value_fn = lambda x: ((x - 1) ** 4).sum() + 0.5 * (x @ x)  # noqa: E731
    h = homotopy(
        "keller", max_corrector_steps=2, min_step=0.05, stage_step=0.4, corrector_rtol=1e-8
    )
    opt = sf.chain(h, sf.scale(-1e-4))
    objective = sf.CountedObjective(value_fn)
    state, x = opt.init(x0), x0
    seen_retry = False
    for _ in range(20):
        value, grad = sf.value_and_grad(objective)(x)
        before = state.states[0]
        updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=objective)
        after = state.states[0]
        if int(after.num_retries) > int(before.num_retries) and not bool(after.abandoned):
            seen_retry = True
            dt = after.t - after.t_path
            assert float(after.step) == pytest.approx(float(before.step) * 0.5)
            assert float(dt) == pytest.approx(float(after.step))
            predicted = after.path_point + dt * after.tangent
            start = x + after.handoff.offset
            assert torch.allclose(start, predicted) or torch.allclose(start, after.path_point)
        x = sf.apply_updates(x, updates)
    final = state.states[0]
    assert seen_retry and bool(final.abandoned) and float(final.t) == 1.0
    assert int(final.num_retries) >= 3 and float(final.step) < 0.05


@pytest.mark.parametrize("shrink", [True, False])
def test_a_stage_ends_when_the_gradient_meets_its_tolerance(shrink):
    # Gradient descent from the last path point (no predictor: on a quadratic the tangent
    # predictor is exact) corrects at a linear rate, so every stage takes several steps and
    # ends at the first step with |grad f_t|_inf <= tol_t, tol_t = rtol (1 - t) |g0|_inf
    # (without the factor 1 - t when shrink=False): check both sides at every stage end.
    a, b, x0 = quadratic(3, torch.float64, seed=2)
    value_fn = lambda x: 0.5 * x @ a @ x - b @ x  # noqa: E731
    g0 = float((a @ x0 - b).abs().max())
    rtol = 1e-2
    h = homotopy(
        "keller",
        schedule=[0.0, 0.5, 0.9, 0.99, 1.0],
        corrector_rtol=rtol,
        shrink_tolerance=shrink,
        predictor="none",
    )
    lr = 1.0 / float(torch.linalg.eigvalsh(a)[-1])
    result = sf.minimize(value_fn, x0, sf.chain(h, sf.scale(-lr)), gtol=1e-8, max_steps=3000)
    rows = result.history[1:]
    ends = 0
    for before, row in itertools.pairwise(rows):
        t = before["continuation_t"]  # the stage whose point this row's grad norm measures
        if t >= 1:
            break
        tol = rtol * g0 * ((1 - t) if shrink else 1.0)
        if row["continuation_stage"] > before["continuation_stage"]:
            assert row["continuation_grad_norm"] <= tol and before["continuation_grad_norm"] > tol
            ends += 1
        else:
            assert row["continuation_grad_norm"] > tol
    assert ends == 3 and result.converged


@pytest.mark.parametrize("retry_last_stage", [False, True])
def test_the_last_stage_is_the_plain_chain_unless_retried(retry_last_stage):
    # One stage straight to t = 1 with a corrector that needs many steps: by default the
    # homotopy stays at t = 1 and lets the chain run to the driver's gtol (no retries);
    # with retry_last_stage=True the slow last stage is retried from x0 with smaller steps.
    x0 = torch.tensor([5.0, -4.0, 3.0], dtype=torch.float64)
    value_fn = lambda x: ((x - 1) ** 4).sum() + 0.5 * (x @ x)  # noqa: E731
    h = homotopy(
        "convex",
        stage_step=1.0,
        max_corrector_steps=3,
        corrector_rtol=1e-3,
        retry_last_stage=retry_last_stage,
    )
    opt = sf.chain(h, sf.newton_krylov(), sf.armijo())
    result = sf.minimize(value_fn, x0, opt, gtol=1e-10, max_steps=200)
    rows = result.history[1:]
    retries = rows[-1]["continuation_retries"]
    ts = [row["continuation_t"] for row in rows]
    assert result.converged
    if retry_last_stage:
        assert retries >= 1 and min(ts[1:]) < 1.0
    else:
        assert retries == 0 and all(t == 1.0 for t in ts)
        # the t = 1 stage took more steps than max_corrector_steps without a retry
        assert sum(1 for row in rows if row["continuation_t_path"] < 1) > 3


def test_chain_adds_params_offset_once_even_when_nested():
    offset = torch.tensor([1.0, -2.0])

    def publish(state, params=None, **extra):
        return {"params_offset": offset}

    mover = Transform(lambda p: EmptyState(), lambda u, s, p=None, **e: (u, s), publish)
    x = torch.zeros(2)
    g = torch.tensor([0.5, 0.5])
    inner = sf.chain(mover, sf.scale(-1.0))
    updates, _ = inner.update(g, inner.init(x), x)
    torch.testing.assert_close(updates, offset - g)
    outer = sf.chain(inner, sf.scale(1.0))
    updates, _ = outer.update(g, outer.init(x), x)
    torch.testing.assert_close(updates, offset - g)
    assert "params_offset" not in sf.publish(outer, outer.init(x), x, grad=g)


def test_homotopy_publishes_the_objective_seen_from_the_predicted_point():
    a, b, x0 = quadratic(3, torch.float64, seed=6)
    value_fn = lambda x: 0.5 * x @ a @ x - b @ x  # noqa: E731
    h = homotopy("convex", corrector_rtol=1e-3)
    value, grad = sf.value_and_grad(value_fn)(x0)
    extra = dict(value=value, grad=grad, value_fn=value_fn)
    out, state = h.update(grad, h.init(x0), x0, **extra)
    published = h.publish(state, x0, **extra)
    offset = published["params_offset"]
    t = float(state.t)
    s = float(state.anchor_curvature)
    shifted = x0 + offset

    def f_t(x):
        return t * value_fn(x) + (1 - t) * 0.5 * s * ((x - x0) @ (x - x0))

    torch.testing.assert_close(published["value_fn"](x0), f_t(shifted))
    torch.testing.assert_close(published["value"], f_t(shifted))
    torch.testing.assert_close(published["grad"], torch.func.grad(f_t)(shifted))
    torch.testing.assert_close(out, published["grad"])
    assert not bool(published["converged_ok"]) and 0 < t < 1


@pytest.mark.parametrize("family", ["keller", "convex", "user"])
def test_update_is_pure(dtype, family):
    a, b, x0 = quadratic(3, dtype, seed=7)

    def value_fn(x):
        return 0.5 * x @ a @ x - b @ x + 0.1 * torch.cos(x).sum()

    fam = (lambda x, t: value_fn(x) + (1 - t) * (x @ x)) if family == "user" else family
    value, grad = sf.value_and_grad(value_fn)(x0)
    # the helper takes the gradient positionally; chain passes it on as the grad extra
    extra = dict(value=value, value_fn=value_fn)
    assert_update_is_pure(sf.chain(homotopy(fam)), x0, grad, steps=3, **extra)
    opt = sf.chain(homotopy(fam, stage_step=0.3), dense_newton(), sf.armijo())
    updates, state = assert_update_is_pure(opt, x0, grad, steps=4, **extra)
    assert updates.dtype == dtype and state.states[0].t.dtype == dtype


def test_state_lives_on_the_params_device(device):
    x0 = torch.ones(3, dtype=torch.float32, device=device)
    value_fn = lambda x: ((x - 2) ** 4).sum()  # noqa: E731
    result = sf.minimize(value_fn, x0, sf.chain(homotopy(), dense_newton(), sf.armijo()), gtol=1e-3)
    state = result.state.states[0]
    assert (
        result.converged
        and state.t.device.type == device.type
        and state.anchor.device.type == device.type
    )


def test_continuation_path_matches_independent_solves():
    # L2-regularized logistic regression from strong to weak regularization; each point is
    # checked against scipy's BFGS solving that lam from scratch.
    gen = torch.Generator().manual_seed(8)
    features = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    labels = (features @ torch.randn(5, generator=gen, dtype=torch.float64) > 0).double()

    def loss(w, lam):
        logits = features @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels) + 0.5 * lam * (
            w @ w
        )

    schedule = [1.0, 0.3, 0.1, 0.03, 0.01]
    opt = sf.chain(dense_newton(), sf.armijo())
    path = continuation_path(loss, torch.zeros(5, dtype=torch.float64), opt, schedule, gtol=1e-9)
    assert path.converged and len(path.params) == len(schedule)
    for lam, w in zip(schedule, path.params, strict=True):

        def fun(v, lam=lam):
            x = torch.tensor(v, requires_grad=True)
            value = loss(x, lam)
            (g,) = torch.autograd.grad(value, x)
            return float(value), g.numpy()

        ref = scipy.optimize.minimize(
            fun,
            torch.zeros(5, dtype=torch.float64).numpy(),
            jac=True,
            method="BFGS",
            options={"gtol": 1e-10},
        )
        torch.testing.assert_close(w, torch.tensor(ref.x), rtol=1e-6, atol=1e-6)
    assert max(path.grad_norms) <= 1e-9


def test_reset_at_stage_change_restarts_the_direction_state():
    lb = sf.directions.lbfgs(memory_size=3)
    wrapped = reset_at_stage_change(lb)
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)  # gradient of sum(a x^2) / 2
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    g = a * x
    _, state = lb.update(a * (x + 1), lb.init(x), x + 1)
    _, state = lb.update(a * (x - 1), state, x - 1)
    fresh_direction, _ = lb.update(g, lb.init(x), x)
    kept_direction, _ = lb.update(g, state, x)
    direction, _ = wrapped.update(g, state, x, continuation_restart=torch.tensor(True))
    torch.testing.assert_close(direction, fresh_direction)
    direction, _ = wrapped.update(g, state, x, continuation_restart=torch.tensor(False))
    torch.testing.assert_close(direction, kept_direction)
    assert not torch.allclose(fresh_direction, kept_direction)


def test_homotopy_with_lbfgs_downstream_converges():
    value_fn = lambda x: ((x - 3) ** 4).sum() + (x**2).sum()  # noqa: E731
    x0 = torch.full((4,), -20.0, dtype=torch.float64)
    opt = sf.chain(homotopy("convex"), reset_at_stage_change(sf.directions.lbfgs()), sf.armijo())
    result = sf.minimize(value_fn, x0, opt, gtol=1e-8)
    assert result.converged
    assert math.isclose(float(result.grad_norm), 0.0, abs_tol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(family="newton"), "family"),
        (dict(schedule="cubic"), "schedule"),
        (dict(schedule=[0.0, 0.5]), "end at 1.0"),
        (dict(schedule=[0.0, 0.6, 0.5, 1.0]), "increasing"),
        (dict(grow=0.5), "grow"),
        (dict(shrink=1.5), "shrink"),
        (dict(min_step=-1.0), "min_step"),
        (dict(max_corrector_steps=0), "max_corrector_steps"),
        (dict(predictor="secant"), "predictor"),
        (dict(anchor_curvature=0.0), "anchor_curvature"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        homotopy(**kwargs)


def test_missing_extras_are_named():
    h = homotopy()
    x = torch.ones(2)
    with pytest.raises(TypeError, match=r"homotopy.*value_fn"):
        h.update(x, h.init(x), x, value=torch.tensor(1.0), grad=x)


@pytest.mark.parametrize("make", [lambda: homotopy("keller"), lambda: homotopy("convex"),
                                  lambda: sf.arclength_homotopy(descend_first=False)])  # fmt: skip
def test_publish_reads_no_tensor_on_the_host(monkeypatch, make):
    a, b, x0 = quadratic(3, torch.float64, seed=9)
    value_fn = lambda x: 0.5 * x @ a @ x - b @ x + 0.1 * torch.cos(x).sum()  # noqa: E731
    h = make()
    state, x = h.init(x0), x0
    for _ in range(3):
        value, grad = sf.value_and_grad(value_fn)(x)
        extra = dict(value=value, grad=grad, value_fn=value_fn)
        updates, state = h.update(grad, state, x, **extra)
        with monkeypatch.context() as patch:
            for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
                patch.setattr(torch.Tensor, name, lambda *args: pytest.fail("host read"))
            published = h.publish(state, x, **extra)
        assert "value_fn" in published
        x = x - 0.1 * updates
