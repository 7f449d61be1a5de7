"""The PINN benchmark problems (benchmarks/pinn.py) and the quick ``pinn`` suite."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bench_pinn, pinn, run

PROBLEMS = [pinn.convection(20.0), pinn.convection(40.0), pinn.reaction(5.0)]
IDS = [p.label for p in PROBLEMS]


def exact_fn(problem):
    return lambda points: problem.exact(points[:, 0], points[:, 1])


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_the_exact_solution_solves_the_pde_and_its_conditions(problem):
    u, u_x, u_t = pinn.input_derivatives(exact_fn(problem), problem.interior)
    scale = 1 + problem.coefficient
    residual = problem.pde(u, u_x, u_t, problem.coefficient)
    assert residual.abs().max() <= 1e-13 * scale
    x, t = problem.initial_x, problem.boundary_t
    torch.testing.assert_close(problem.exact(x, 0 * x), problem.initial(x), rtol=0, atol=1e-15)
    left, right = problem.exact(0 * t, t), problem.exact(0 * t + 2 * math.pi, t)
    torch.testing.assert_close(left, right, rtol=0, atol=1e-12)


@pytest.mark.parametrize("problem", PROBLEMS, ids=IDS)
def test_the_error_of_the_exact_solution_is_zero(problem):
    exact = problem.exact(problem.test_points[:, 0], problem.test_points[:, 1])
    assert pinn.relative_error(problem, exact) == 0
    assert pinn.relative_error(problem, torch.zeros_like(exact)) == pytest.approx(1.0)


def test_the_network_derivatives_match_autograd():
    problem = pinn.reaction(5.0, sizes=(50, 8, 4))
    model, params = pinn.make_model(7, 3, seed=1)
    carried = torch.func.functional_call(model, params, (problem.interior,), {"derivatives": True})
    by_autograd = pinn.input_derivatives(model, problem.interior)
    for a, b in zip(carried, by_autograd, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


def test_the_loss_is_half_the_squared_residual_norm_of_the_paper():
    problem = pinn.convection(20.0, sizes=(40, 16, 8))
    model, params = pinn.make_model(5, 2, seed=0)
    r = pinn.residual_fn(problem, model)(params)
    assert r.shape == (40 + 16 + 8,) and r.dtype == torch.float64
    _, u_x, u_t = torch.func.functional_call(
        model, params, (problem.interior,), {"derivatives": True}
    )
    edge = lambda x, t: model(torch.stack([x, t], dim=1))  # noqa: E731
    x, t = problem.initial_x, problem.boundary_t
    expected = 0.5 * (
        (u_t + 20.0 * u_x).pow(2).mean()
        + (edge(x, 0 * x) - torch.sin(x)).pow(2).mean()
        + (edge(0 * t, t) - edge(0 * t + 2 * math.pi, t)).pow(2).mean()
    )
    params = {k: v.requires_grad_() for k, v in params.items()}
    value = pinn.value_fn(problem, model)(params)
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-12, atol=0)
    grads = torch.autograd.grad(value, list(params.values()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_fresh_collocation_points_are_independent_and_the_exact_solution_fits_them():
    problem = pinn.reaction(5.0, sizes=(300, 16, 8))
    fresh = pinn.fresh_collocation(problem, 200)
    assert (
        fresh.interior.shape == (200, 2) and not torch.isin(fresh.interior, problem.interior).any()
    )
    assert not torch.isin(fresh.initial_x, problem.initial_x).any()
    assert not torch.isin(fresh.boundary_t, problem.boundary_t).any()
    x, t = fresh.interior[:, 0], fresh.interior[:, 1]
    assert x.min() >= 0 and x.max() < 2 * math.pi and t.min() >= 0 and t.max() <= 1
    u, u_x, u_t = pinn.input_derivatives(exact_fn(fresh), fresh.interior)
    assert fresh.pde(u, u_x, u_t, fresh.coefficient).abs().max() <= 1e-12


def test_the_quick_suite_runs_and_makes_its_table():
    rows = bench_pinn.SUITES["pinn"](True)
    methods = {row["method"] for row in rows}
    assert {bench_pinn.PEER, "lbfgs", "newton_cg"} <= methods
    assert {row["pde"] for row in rows} == {"convection beta=20", "reaction rho=5"}
    for row in rows:
        assert math.isfinite(row["l2re"]) and row["l2re"] > 0
        if row["method"] != f"adam_{bench_pinn.QUICK.adam_iters}_start":
            assert math.isfinite(row["fresh_loss"]) and row["fresh_loss"] > 0
        if row["method"] == bench_pinn.PEER:
            assert row["l2re_vs_peer"] == 1
    assert "l2re_vs_peer" in run.format_table(rows)
