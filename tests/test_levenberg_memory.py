"""Levenberg-Marquardt within a memory budget: the mode chosen from the shapes, the chunked
Jacobian, the m x m reduced solve for m < n, agreement of the modes, and the peak memory
of building the Jacobian (in a subprocess) against one ``jacfwd`` over all columns."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.func as tf

import soo_func as sf
from soo_func import tree
from soo_func.searches.damped_gauss_newton import solve_damped_dense, solve_damped_wide
from soo_func.searches.levenberg import levenberg_mode
from soo_func.searches.levenberg_jacobian import (
    CHUNK_ROWS,
    chunk_count,
    chunk_length,
    column_sq,
    default_max_jacobian_bytes,
    jacobian,
    jacobian_bytes,
    known_rows,
)
from soo_func.searches.levenberg_options import LevenbergOptions
from soo_func.searches.levenberg_update import Point, solver_choice

D = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def mlp_params(sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = torch.randn(b, a, generator=g, dtype=D) / math.sqrt(a)
        params[f"b{i}"] = 0.1 * torch.randn(b, generator=g, dtype=D)
    return params


def convection_residual(points: int, seed: int = 1):
    """``u_t + 2 u_x - sin(x)`` of a tanh MLP ``u(x, t)`` at ``points`` collocation points
    (input derivatives by forward mode inside the residual, as in a PINN)."""
    xt = torch.rand(points, 2, generator=torch.Generator().manual_seed(seed), dtype=D)
    e_x = torch.tensor([1.0, 0.0], dtype=D).expand_as(xt)
    e_t = torch.tensor([0.0, 1.0], dtype=D).expand_as(xt)

    def u(p, z):
        layers = len(p) // 2
        for i in range(layers):
            z = z @ p[f"w{i}"].T + p[f"b{i}"]
            if i < layers - 1:
                z = torch.tanh(z)
        return z[:, 0]

    def residual(p):
        u_t = tf.jvp(lambda z: u(p, z), (xt,), (e_t,))[1]
        u_x = tf.jvp(lambda z: u(p, z), (xt,), (e_x,))[1]
        return u_t + 2.0 * u_x - torch.sin(xt[:, 0])

    return residual


def jacrev_matrix(residual, params) -> torch.Tensor:
    raveled = tree.ravel(params)
    return tf.jacrev(lambda x: residual(tree.unravel(x, raveled)))(raveled.flat)


def point(residual=None, curvature=None) -> Point:
    return Point(lambda p: p, residual, curvature, torch.zeros(()), None)


# --- mode selection from shapes and budget -----------------------------------------------


def test_solver_choice_from_what_is_known_before_evaluating():
    lm, lev = LevenbergOptions(dense_max_params=None), LevenbergOptions()
    fn = lambda p: p  # noqa: E731
    assert solver_choice(lm, point(fn), 10**6) == "fit"
    assert solver_choice(lev, point(fn), 200) == "fit"
    assert solver_choice(lev, point(fn), 201) == "cg"
    assert solver_choice(lm, point(None), 5) == "cg"
    assert solver_choice(lm, point(fn, curvature=fn), 5) == "cg"
    assert solver_choice(LevenbergOptions(solver="dense"), point(fn), 10**6) == "dense"
    assert solver_choice(LevenbergOptions(solver="cg"), point(fn), 3) == "cg"


def test_chunk_sizes_from_shapes():
    assert chunk_length(5301, 2300, None) == CHUNK_ROWS // 2300
    assert chunk_length(10, 3, None) == 10
    assert chunk_length(10, 10**9, None) == 1
    assert chunk_length(10, 3, 4) == 4
    assert chunk_count(2300, 5301) == math.ceil(2300 / (CHUNK_ROWS // 2300))  # rows
    assert chunk_count(100, 20) == 1
    assert chunk_count(100, 20, chunk_size=3) == 7
    assert jacobian_bytes(2300, 5301, torch.float64) == 2300 * 5301 * 8
    assert jacobian_bytes(2, 3, torch.float32) == 24
    assert default_max_jacobian_bytes(torch.device("cpu")) > 0


@pytest.mark.parametrize(
    ("kwargs", "mode"),
    [
        ({}, "dense"),
        ({"chunk_size": 3}, "dense_chunked"),
        ({"max_jacobian_bytes": 8}, "matrix_free"),
        ({"solver": "dense", "max_jacobian_bytes": 8}, "dense"),
        ({"solver": "cg"}, "matrix_free"),
    ],
)
def test_mode_follows_the_budget_and_is_in_the_state(kwargs, mode):
    residual, params = convection_residual(40), mlp_params([2, 4, 1])  # m = 40, n = 17
    opt = sf.levenberg_marquardt(**kwargs)
    state = opt.init(params)
    assert levenberg_mode(state) is None
    res = sf.least_squares(residual, params, opt, max_steps=3)
    assert levenberg_mode(res.state) == mode


def test_levenberg_marquardt_has_no_parameter_limit_levenberg_keeps_its_own():
    residual, params = convection_residual(30), mlp_params([2, 16, 16, 1])  # n = 337 > 200
    res = sf.least_squares(residual, params, sf.levenberg_marquardt(), max_steps=2)
    assert levenberg_mode(res.state) == "dense"  # 30 x 337: rows by vjp, the m x m solve
    res = sf.least_squares(residual, params, sf.levenberg(), max_steps=2)
    assert levenberg_mode(res.state) == "matrix_free"


# --- the chunked Jacobian --------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "sizes", "chunk"),
    [(60, [2, 3, 1], 4), (60, [2, 3, 1], None), (15, [2, 5, 1], 4), (15, [2, 5, 1], None)],
)
def test_chunked_jacobian_equals_jacrev(points, sizes, chunk):
    residual, params = convection_residual(points), mlp_params(sizes)
    expected = jacrev_matrix(residual, params)
    for _ in range(2):  # m unknown (the first chunk tells it), then remembered
        built = jacobian(residual, params, chunk)
        assert known_rows(residual) == points
        torch.testing.assert_close(built.jac, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(built.residuals, residual(params), rtol=0, atol=0)
        sq, _ = column_sq(residual, params, chunk)
        torch.testing.assert_close(sq, (expected * expected).sum(0), rtol=1e-12, atol=1e-12)
    n = tree.ravel(params).flat.numel()
    assert built.products == min(points, n)


def test_chunked_jacobian_under_vmap():
    residual = convection_residual(12)
    stacked = {k: torch.stack([v, 1.5 * v]) for k, v in mlp_params([2, 5, 1]).items()}
    batched = tf.vmap(lambda p: jacobian(residual, p, 3).jac)(stacked)
    for i in range(2):
        one = {k: v[i] for k, v in stacked.items()}
        torch.testing.assert_close(batched[i], jacrev_matrix(residual, one), rtol=1e-12, atol=1e-12)


def test_jacobian_over_the_budget_is_not_built():
    residual, params = convection_residual(50), mlp_params([2, 6, 1])  # n = 25
    out = jacobian(residual, params, None, max_bytes=50 * 25 * 8 - 1)
    assert out.jac is None
    out = jacobian(residual, params, None, max_bytes=50 * 25 * 8)
    assert out.jac is not None and out.jac.shape == (50, 25)


# --- the m x m reduced solve ------------------------------------------------------------


@pytest.mark.parametrize("damping", [1e-6, 1.0])
def test_wide_solve_is_the_damped_least_squares_solution(damping):
    g = torch.Generator().manual_seed(3)
    jac, r = torch.randn(7, 19, generator=g, dtype=D), torch.randn(7, generator=g, dtype=D)
    diag = torch.rand(19, generator=g, dtype=D) + 0.5
    lam = torch.tensor(damping, dtype=D)
    p = solve_damped_wide(jac, r, lam, diag)
    normal = jac.T @ jac + lam * torch.diag(diag)  # n x n (condition ~ 1 / lam): a reference
    torch.testing.assert_close(p, torch.linalg.solve(normal, -jac.T @ r), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(solve_damped_dense(jac, r, lam, diag), p, rtol=0, atol=0)
    # the m x m form: p = -D^-1 J^T (J D^-1 J^T + lam I)^-1 r
    small = jac / diag @ jac.T + lam * torch.eye(7, dtype=D)
    torch.testing.assert_close(
        p, -(jac.T @ torch.linalg.solve(small, r)) / diag, rtol=1e-9, atol=1e-11
    )


# --- the modes agree --------------------------------------------------------------------


@pytest.mark.parametrize(("points", "sizes"), [(40, [2, 4, 1]), (12, [2, 5, 1])])
def test_modes_agree_on_a_small_problem(points, sizes):
    """Nielsen's rule in each mode: the same damped steps (the dense ones to rounding, the
    matrix-free one to CG's accuracy, which the ill-conditioned m < n model amplifies)."""
    residual = convection_residual(points)
    finals = {}
    for name, kwargs in {
        "dense": {},
        "dense_chunked": {"chunk_size": 2},
        "matrix_free": {"max_jacobian_bytes": 8, "cg_rtol": 1e-13},
    }.items():
        opt = sf.levenberg_marquardt(damping_rule="nielsen", **kwargs)
        res = sf.least_squares(residual, mlp_params(sizes), opt, max_steps=4, gtol=0.0)
        assert levenberg_mode(res.state) == name
        finals[name] = (tree.ravel(res.params).flat, res.value)
    ref, ref_value = finals["dense"]
    torch.testing.assert_close(finals["dense_chunked"][0], ref, rtol=1e-6, atol=1e-8)
    flat, value = finals["matrix_free"]
    torch.testing.assert_close(flat, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-12)


def test_more_rule_solves_an_underdetermined_fit():
    residual, params = convection_residual(10), mlp_params([2, 8, 1])  # 10 x 33
    res = sf.least_squares(residual, params, sf.levenberg_marquardt(), max_steps=50)
    assert levenberg_mode(res.state) == "dense"
    assert float(res.value) < 1e-12


# --- the peak memory of building the Jacobian --------------------------------------------

PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_levenberg_memory import convection_residual, mlp_params
    from soo_func.searches.levenberg_jacobian import dense_jacobian, jacobian
    torch.set_num_threads(1)
    residual, params = convection_residual({points}), mlp_params({sizes})
    small = mlp_params([2, 2, 1])
    jacobian(residual, small, 1)  # warm up the kernels and remember m
    dense_jacobian(residual, small)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = peak()
    chunked = jacobian(residual, params, {chunk}).jac
    new = peak() - before  # the high-water mark: the chunked build first, then jacfwd
    del chunked
    whole = dense_jacobian(residual, params)[0]
    print(json.dumps({{"new": new, "old": peak() - before, "bytes": whole.numel() * 8}}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_building_the_jacobian_peaks_at_a_few_jacobians_not_n_forward_passes():
    """m = 400 residuals, n = 609 parameters: J is 1.9 MB. One ``jacfwd`` holds the work of
    all 609 columns at once (about 200 Jacobians measured); the chunked build (rows by
    ``vjp``, 8 at a time) stays within a few (about 7 measured, allocator noise included)."""
    points, sizes, chunk = 400, [2, 16, 16, 16, 1], 8
    script = PEAK_SCRIPT.format(tests=str(ROOT / "tests"), points=points, sizes=sizes, chunk=chunk)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["bytes"] == 400 * 609 * 8
    assert peaks["new"] <= 20 * peaks["bytes"], peaks
    assert peaks["old"] > 20 * peaks["bytes"], peaks


@pytest.mark.parametrize("points", [[8, 40], [40, 8]])  # wide then tall, tall then wide
def test_a_stale_row_count_plans_chunks_but_never_shapes(points):
    """The remembered ``m`` of a function object is a plan only: one function object whose
    residual count changes between calls (a closure over a resized batch) still gets its
    exact Jacobian."""
    params = mlp_params([2, 5, 1])
    box = {"residual": convection_residual(points[0])}

    def residual(p):
        return box["residual"](p)

    for count in points:
        box["residual"] = convection_residual(count)
        built = jacobian(residual, params, 3)
        torch.testing.assert_close(
            built.jac, jacrev_matrix(box["residual"], params), rtol=1e-12, atol=1e-12
        )
