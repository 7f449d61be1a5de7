"""Moré's LM parameter under ``vmap`` (the batched fits' path), checked independently: each
member's step solves the damped normal equations with numpy at the ``lam`` found, the model
terms ``|J p|^2`` and ``-<r, J p>`` (taken from the SVD) equal the products with ``J``, and the
vmapped call equals the per-problem calls (float64, 1e-10); and the batched loop's in-place
scatter leaves the caller's starts as they were."""

from __future__ import annotations

import numpy as np
import torch

import soo_func as sf
from soo_func.searches.more_radius import lm_parameter


def _batch(count=64, m=12, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 4, n, dtype=torch.float64)
    jac = torch.randn(count, m, n, generator=gen, dtype=torch.float64) * scales
    jac[: count // 4, :, -1] = jac[: count // 4, :, 0]  # a quarter rank-deficient
    r = torch.randn(count, m, generator=gen, dtype=torch.float64)
    diag = torch.rand(count, n, generator=gen, dtype=torch.float64) + 0.5
    radius = 10.0 ** torch.empty(count, dtype=torch.float64).uniform_(-4, 1, generator=gen)
    return jac, r, diag, radius


def test_vmapped_parameter_against_numpy_and_the_per_problem_calls():
    jac, r, diag, radius = _batch()
    out = torch.func.vmap(lm_parameter)(jac, r, diag, radius)
    damped = 0
    for i in range(len(jac)):
        alone = lm_parameter(jac[i], r[i], diag[i], radius[i])
        for got, want in zip(out, alone, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-14)
        J, d, ri = jac[i].numpy(), diag[i].numpy(), r[i].numpy()
        lam, p = float(out.damping[i]), out.step[i].numpy()
        jp = J @ p
        scale = float(ri @ ri)
        assert abs(float(out.model_sq[i]) - jp @ jp) <= 1e-10 * scale
        assert abs(float(out.model_slope[i]) + ri @ jp) <= 1e-10 * scale
        scaled = np.linalg.norm(d * p)
        assert abs(float(out.scaled_norm[i]) - scaled) <= 1e-10 * scaled
        if lam > 0 and i >= len(jac) // 4:
            damped += 1
            want = np.linalg.solve(J.T @ J + lam * np.diag(d * d), -J.T @ ri)
            np.testing.assert_allclose(p, want, rtol=1e-8, atol=1e-14)
            assert abs(np.linalg.norm(d * p) - float(radius[i])) <= 0.1 * float(radius[i])
    assert damped > 10  # the radius binds for many members


def test_the_batched_solve_leaves_the_callers_starts_alone():
    t = torch.linspace(0.0, 4.0, 16, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    truth = torch.rand(40, 3, generator=gen, dtype=torch.float64) + 0.5
    ys = truth[:, :1] * torch.exp(-truth[:, 1:2] * t) + truth[:, 2:]

    def residual(p, y):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    x0s = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64).repeat(40, 1)
    before = x0s.clone()
    result = sf.batched_least_squares(residual, x0s, args=(ys,), max_steps=30)
    assert len(set(result.num_steps.tolist())) > 1  # compaction ran
    torch.testing.assert_close(x0s, before, rtol=0, atol=0)
    torch.testing.assert_close(result.params, truth, rtol=0, atol=1e-4)  # stopped at gtol 1e-5
