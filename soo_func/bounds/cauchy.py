"""The two model steps of L-BFGS-B on the box: the generalized Cauchy point and the
subspace minimization (Byrd, Lu, Nocedal & Zhu, "A limited memory algorithm for bound
constrained optimization", SIAM J. Sci. Comput. 16 (1995), sections 4 and 5.1, with the
projection rule of Morales & Nocedal, ACM TOMS 38 (2011)).

The model is ``m(x) = <g, x - x0> + 0.5 (x - x0)^T B (x - x0)`` with the compact BFGS
matrix ``B = sigma I + V F V^T`` (``V = [S Y]``, ``n x 2m``; ``F`` the kernel of
:func:`soo_func.directions.compact.bfgs_direct_kernel`).

Both steps are written with fixed shapes and no host read: the breakpoints are sorted once
and the model's slope and curvature on every segment of the projected-gradient path come
from prefix sums (the book's sequential scan over the breakpoints, vectorized).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from soo_func.bounds.box import Box

__all__ = ["CauchyPoint", "breakpoints", "generalized_cauchy_point", "subspace_minimizer"]


class CauchyPoint(NamedTuple):
    """``point``: the generalized Cauchy point ``x^c``; ``free``: the entries strictly
    inside their bounds there (the subspace of the next step)."""

    point: torch.Tensor
    free: torch.Tensor


def breakpoints(x: torch.Tensor, g: torch.Tensor, box: Box) -> torch.Tensor:
    """``t_i`` where the path ``x - t g`` meets entry ``i``'s bound (BLNZ eq. 4.1);
    ``+inf`` where ``g_i = 0`` or the bound is absent, ``0`` where ``x_i`` already sits on
    the bound that ``-g_i`` points past."""
    inf = torch.full_like(x, torch.inf)
    to_upper = torch.where(g < 0, (x - box.upper) / torch.where(g < 0, g, -1.0), inf)
    to_lower = torch.where(g > 0, (x - box.lower) / torch.where(g > 0, g, 1.0), inf)
    t = torch.where(g < 0, to_upper, to_lower)
    return torch.clamp(torch.nan_to_num(t, nan=torch.inf), min=0.0)


def generalized_cauchy_point(
    x: torch.Tensor,
    g: torch.Tensor,
    box: Box,
    sigma: torch.Tensor,
    columns: torch.Tensor,
    kernel: torch.Tensor,
) -> CauchyPoint:
    """The first local minimizer of ``m`` along ``P(x - t g)``, ``t >= 0`` (BLNZ Alg. CP).

    On segment ``j`` (after the ``j`` smallest breakpoints), with ``G_j`` the sum of ``g_i^2``
    over the entries still moving, ``p_j = -sum v_i g_i`` over them and ``h_j = sum t_i v_i
    g_i`` over the stopped ones (``v_i`` row ``i`` of ``V``), the path from its start
    ``t_{j-1}`` has slope and curvature (BLNZ eqs. 4.8-4.9 in the ``V F V^T`` form)
    ``f'_j = (sigma t_{j-1} - 1) G_j + p_j^T F (t_{j-1} p_j - h_j)``,
    ``f''_j = sigma G_j + p_j^T F p_j``. The minimizer lies on the first segment with
    ``f'_j >= 0`` or ``-f'_j / f''_j`` shorter than the segment.

    ``columns``: ``V`` as ``[2m, n]`` (rows ``s_0..s_{m-1}, y_0..y_{m-1}``).
    """
    t = breakpoints(x, g, box)
    order = torch.argsort(t)
    ts, gs = t[order], g[order]
    finite = torch.isfinite(ts)
    vg = columns[:, order].T * gs[:, None]  # [n, 2m]: v_i g_i in breakpoint order
    zero_row = vg.new_zeros(1, vg.shape[1])
    # Segment j = 0..n: entries j.. still move; entries ..j-1 have stopped.
    moving_g2 = torch.cat([torch.flip(torch.cumsum(torch.flip(gs * gs, [0]), 0), [0]),
                           gs.new_zeros(1)])  # fmt: skip
    moving_vg = torch.cat([torch.flip(torch.cumsum(torch.flip(vg, [0]), 0), [0]), zero_row])
    stopped_tvg = torch.cat([zero_row, torch.cumsum(torch.where(finite[:, None],
                            ts[:, None] * vg, 0.0), 0)])  # fmt: skip
    start = torch.cat([ts.new_zeros(1), torch.where(finite, ts, 0.0)])
    end = torch.cat([ts, ts.new_full((1,), torch.inf)])
    p = -moving_vg
    fp = p @ kernel  # [n+1, 2m]: p_j^T F
    slope = (sigma * start - 1.0) * moving_g2 + (fp * (start[:, None] * p - stopped_tvg)).sum(1)
    curvature = sigma * moving_g2 + (fp * p).sum(1)
    inside = curvature > 0
    step = -slope / torch.where(inside, curvature, torch.ones_like(curvature))
    stops = (slope >= 0) | (inside & (step < end - start)) | ~torch.isfinite(end - start)
    j = torch.argmax(stops.to(torch.int8))  # the first segment where the path stops
    t_c = start[j] + torch.clamp(torch.where(slope[j] >= 0, 0.0, step[j]), min=0.0)
    t_c = torch.where(torch.isfinite(t_c), t_c, start[j])
    point = box.project(x - t_c * g)
    free = (t > t_c) & (point > box.lower) & (point < box.upper)
    return CauchyPoint(point, free)


def subspace_minimizer(
    x: torch.Tensor,
    g: torch.Tensor,
    box: Box,
    sigma: torch.Tensor,
    columns: torch.Tensor,
    kernel: torch.Tensor,
    cauchy: CauchyPoint,
) -> torch.Tensor:
    """The target point of the step: ``x^c`` moved by the minimizer of ``m`` over its free
    entries (the others fixed at ``x^c``; BLNZ section 5.1, direct primal method).

    With ``Z`` selecting the free entries, ``r = Z^T (g + B (x^c - x))`` and
    ``Z^T B Z = sigma I + U F U^T`` (``U = Z^T V``), the Woodbury identity gives
    ``d = -(r / sigma - U (I + F U^T U / sigma)^{-1} F U^T r / sigma^2)``. The
    unconstrained subspace point ``x^c + d`` is projected on the box when that keeps a
    descent direction from ``x`` (Morales & Nocedal 2011), else cut back along ``d`` to
    the box.
    """
    free = cauchy.free
    z = cauchy.point - x
    model_grad = g + sigma * z + columns.T @ (kernel @ (columns @ z))
    r = torch.where(free, model_grad, 0.0)
    u = torch.where(free[None, :], columns, 0.0)  # [2m, n]: U^T
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    inner = eye + kernel @ (u @ u.T) / sigma
    coef = torch.linalg.solve(inner, kernel @ (u @ r)) / sigma**2
    d = -(r / sigma - u.T @ coef)
    d = torch.where(free & torch.isfinite(d), d, 0.0)
    projected = box.project(cauchy.point + d)
    descent = torch.dot(g, projected - x) < 0
    room = torch.where(d > 0, (box.upper - cauchy.point) / torch.where(d > 0, d, 1.0),
                       torch.where(d < 0, (box.lower - cauchy.point) / torch.where(d < 0, d, -1.0),
                                   torch.inf))  # fmt: skip
    cut = torch.clamp(room.amin() if room.numel() else room.new_ones(()), max=1.0)
    return torch.where(descent, projected, box.project(cauchy.point + cut * d))
