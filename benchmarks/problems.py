"""Classic test problems: the Moré-Garbow-Hillstrom (1981) set.

J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization
software", ACM TOMS 7(1):17-41, 1981. Every problem there is a sum of squares
``f(x) = sum_i r_i(x)^2`` (MGH's ``f``, *not* ``0.5 * sum``), so each is written once
as a residual function and exposed twice:

* ``LEAST_SQUARES[name]``: an :class:`LSProblem` (``residual_fn(x) -> Tensor[m]``).
  soo_func's :func:`~soo_func.least_squares` minimizes ``0.5 * ||r||^2``; its optimal
  value is ``0.5 * f_opt``.
* ``UNCONSTRAINED[name]``: a :class:`Problem` with ``fn(x) = sum(r(x)**2)``.

``x0`` is MGH's standard starting point (float64 on the CPU; cast it with
``.to(dtype, device)``), ``f_opt`` the certified minimum value of ``f`` from the
paper (``None`` where none is stated). The functions are pure torch (no in-place
ops, no host syncs), so they run in float32 and float64, on any device and under
``torch.func`` transforms.

:func:`scipy_funcs` gives numpy ``fun``, ``jac``, ``hess`` and ``hessp`` (torch
autograd in float64) so peers call scipy on the very same problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LEAST_SQUARES",
    "UNCONSTRAINED",
    "LSProblem",
    "Problem",
    "ScipyFuncs",
    "scipy_funcs",
]


class Problem(NamedTuple):
    """An unconstrained problem: minimize ``fn(x)`` from ``x0`` (``f_opt``: best known value)."""

    name: str
    n: int
    fn: Callable[[Tensor], Tensor]
    x0: Tensor
    f_opt: float | None


class LSProblem(NamedTuple):
    """A least-squares problem: ``f(x) = sum(residual_fn(x)**2)``, ``m`` residuals, ``n`` unknowns."""

    name: str
    m: int
    n: int
    residual_fn: Callable[[Tensor], Tensor]
    x0: Tensor
    f_opt: float | None


def _c(values, like: Tensor) -> Tensor:
    """A constant tensor with the dtype and device of ``like``."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def _idx(m: int, like: Tensor, start: int = 1) -> Tensor:
    """``start, start+1, ..., start+m-1`` as a tensor like ``like``."""
    return torch.arange(start, start + m, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# Residual functions, numbered as in MGH (1981).
# ---------------------------------------------------------------------------------------------


def rosenbrock(x: Tensor) -> Tensor:
    """(1) Rosenbrock: ``r = (10 (x2 - x1^2), 1 - x1)``."""
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x: Tensor) -> Tensor:
    """(2) Freudenstein and Roth."""
    return torch.stack(
        [
            -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
            -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
        ]
    )


def powell_badly_scaled(x: Tensor) -> Tensor:
    """(3) Powell badly scaled."""
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x: Tensor) -> Tensor:
    """(4) Brown badly scaled."""
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


def beale(x: Tensor) -> Tensor:
    """(5) Beale: ``r_i = y_i - x1 (1 - x2^i)``."""
    i = _idx(3, x)
    y = _c([1.5, 2.25, 2.625], x)
    return y - x[0] * (1 - x[1] ** i)


def jennrich_sampson(x: Tensor) -> Tensor:
    """(6) Jennrich and Sampson, m = 10: ``r_i = 2 + 2i - (exp(i x1) + exp(i x2))``."""
    i = _idx(10, x)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def helical_valley(x: Tensor) -> Tensor:
    """(7) Helical valley, with MGH's ``theta = atan(x2/x1)/(2 pi) (+ 1/2 if x1 < 0)``."""
    theta = torch.atan(x[1] / x[0]) / (2 * math.pi) + torch.where(x[0] < 0, 0.5, 0.0)
    return torch.stack(
        [10 * (x[2] - 10 * theta), 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]]
    )


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x: Tensor) -> Tensor:
    """(8) Bard: ``r_i = y_i - (x1 + u_i / (v_i x2 + w_i x3))``, u = i, v = 16 - i, w = min(u, v)."""
    u = _idx(15, x)
    v = 16 - u
    w = torch.minimum(u, v)
    return _c(_BARD_Y, x) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSSIAN_Y = [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989]
_GAUSSIAN_Y = _GAUSSIAN_Y + _GAUSSIAN_Y[-2::-1]


def gaussian(x: Tensor) -> Tensor:
    """(9) Gaussian: ``r_i = x1 exp(-x2 (t_i - x3)^2 / 2) - y_i``, t_i = (8 - i)/2."""
    t = (8 - _idx(15, x)) / 2
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _c(_GAUSSIAN_Y, x)


_MEYER_Y = [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427]
_MEYER_Y = [*_MEYER_Y, 3820, 3307, 2872]


def meyer(x: Tensor) -> Tensor:
    """(10) Meyer: ``r_i = x1 exp(x2 / (t_i + x3)) - y_i``, t_i = 45 + 5i."""
    t = 45 + 5 * _idx(16, x)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _c(_MEYER_Y, x)


def gulf(x: Tensor, m: int = 99) -> Tensor:
    """(11) Gulf research and development, m = 99: ``r_i = exp(-|y_i - x2|^x3 / x1) - t_i``."""
    t = _idx(m, x) / 100
    y = 25 + (-50 * torch.log(t)) ** (2 / 3)
    return torch.exp(-(torch.abs(y - x[1]) ** x[2]) / x[0]) - t


def box_3d(x: Tensor, m: int = 10) -> Tensor:
    """(12) Box three-dimensional, m = 10, t_i = 0.1 i."""
    t = 0.1 * _idx(m, x)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


def powell_singular(x: Tensor) -> Tensor:
    """(13) Powell singular."""
    return torch.stack(
        [
            x[0] + 10 * x[1],
            math.sqrt(5) * (x[2] - x[3]),
            (x[1] - 2 * x[2]) ** 2,
            math.sqrt(10) * (x[0] - x[3]) ** 2,
        ]
    )


def wood(x: Tensor) -> Tensor:
    """(14) Wood."""
    return torch.stack(
        [
            10 * (x[1] - x[0] ** 2),
            1 - x[0],
            math.sqrt(90) * (x[3] - x[2] ** 2),
            1 - x[2],
            math.sqrt(10) * (x[1] + x[3] - 2),
            (x[1] - x[3]) / math.sqrt(10),
        ]
    )


_KOWALIK_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235]
_KOWALIK_Y = [*_KOWALIK_Y, 0.0246]
_KOWALIK_U = [4, 2, 1, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x: Tensor) -> Tensor:
    """(15) Kowalik and Osborne: ``r_i = y_i - x1 (u_i^2 + u_i x2) / (u_i^2 + u_i x3 + x4)``."""
    u = _c(_KOWALIK_U, x)
    return _c(_KOWALIK_Y, x) - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x: Tensor) -> Tensor:
    """(16) Brown and Dennis, m = 20, t_i = i/5."""
    t = _idx(20, x) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OSBORNE1_Y = [
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
    0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
    0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406,
]  # fmt: skip


def osborne1(x: Tensor) -> Tensor:
    """(17) Osborne 1, m = 33, t_i = 10 (i - 1)."""
    t = 10 * _idx(33, x, start=0)
    model = x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4])
    return _c(_OSBORNE1_Y, x) - model


def biggs_exp6(x: Tensor, m: int = 13) -> Tensor:
    """(18) Biggs EXP6, m = 13, t_i = 0.1 i, y_i = exp(-t) - 5 exp(-10 t) + 3 exp(-4 t)."""
    t = 0.1 * _idx(m, x)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return (
        x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y
    )


_OSBORNE2_Y = [
    1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746,
    0.679, 0.608, 0.655, 0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649,
    0.694, 0.644, 0.624, 0.661, 0.612, 0.558, 0.533, 0.495, 0.500, 0.423, 0.395,
    0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429, 0.523, 0.562, 0.607, 0.653,
    0.672, 0.708, 0.633, 0.668, 0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739,
    0.710, 0.729, 0.720, 0.636, 0.581, 0.428, 0.292, 0.162, 0.098, 0.054,
]  # fmt: skip


def osborne2(x: Tensor) -> Tensor:
    """(19) Osborne 2, m = 65, t_i = (i - 1)/10."""
    t = _idx(65, x, start=0) / 10
    model = (
        x[0] * torch.exp(-t * x[4])
        + x[1] * torch.exp(-((t - x[8]) ** 2) * x[5])
        + x[2] * torch.exp(-((t - x[9]) ** 2) * x[6])
        + x[3] * torch.exp(-((t - x[10]) ** 2) * x[7])
    )
    return _c(_OSBORNE2_Y, x) - model


def watson(x: Tensor) -> Tensor:
    """(20) Watson, m = 31, t_i = i/29 (i = 1..29), plus r_30 = x1, r_31 = x2 - x1^2 - 1."""
    n = x.shape[0]
    t = _idx(29, x) / 29
    powers = t[:, None] ** _idx(n, x, start=0)[None, :]  # t_i^k, k = 0..n-1
    derivative = powers[:, : n - 1] @ (_idx(n - 1, x) * x[1:])
    value = powers @ x
    r = derivative - value**2 - 1
    return torch.cat([r, torch.stack([x[0], x[1] - x[0] ** 2 - 1])])


def extended_rosenbrock(x: Tensor) -> Tensor:
    """(21) Extended Rosenbrock (n even): Rosenbrock on each pair (x_{2i-1}, x_{2i})."""
    odd, even = x[0::2], x[1::2]
    return torch.stack([10 * (even - odd**2), 1 - odd], dim=1).reshape(-1)


def extended_powell(x: Tensor) -> Tensor:
    """(22) Extended Powell singular (n a multiple of 4): problem 13 on each block of 4."""
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    r = torch.stack(
        [a + 10 * b, math.sqrt(5) * (c - d), (b - 2 * c) ** 2, math.sqrt(10) * (a - d) ** 2], dim=1
    )
    return r.reshape(-1)


def penalty1(x: Tensor, a: float = 1e-5) -> Tensor:
    """(23) Penalty I: ``r_i = sqrt(a)(x_i - 1)``, ``r_{n+1} = sum x_j^2 - 1/4``."""
    return torch.cat([math.sqrt(a) * (x - 1), (torch.sum(x**2) - 0.25).reshape(1)])


def penalty2(x: Tensor, a: float = 1e-5) -> Tensor:
    """(24) Penalty II, m = 2n."""
    n = x.shape[0]
    i = _idx(n - 1, x, start=2)
    y = torch.exp(i / 10) + torch.exp((i - 1) / 10)
    e = torch.exp(x / 10)
    first = (x[0] - 0.2).reshape(1)
    middle = math.sqrt(a) * (e[1:] + e[:-1] - y)
    tail = math.sqrt(a) * (e[1:] - math.exp(-0.1))
    weights = n - _idx(n, x) + 1
    last = (torch.sum(weights * x**2) - 1).reshape(1)
    return torch.cat([first, middle, tail, last])


def variably_dimensioned(x: Tensor) -> Tensor:
    """(25) Variably dimensioned, m = n + 2."""
    s = torch.sum(_idx(x.shape[0], x) * (x - 1)).reshape(1)
    return torch.cat([x - 1, s, s**2])


def trigonometric(x: Tensor) -> Tensor:
    """(26) Trigonometric: ``r_i = n - sum cos x_j + i (1 - cos x_i) - sin x_i``."""
    n = x.shape[0]
    return n - torch.sum(torch.cos(x)) + _idx(n, x) * (1 - torch.cos(x)) - torch.sin(x)


def brown_almost_linear(x: Tensor) -> Tensor:
    """(27) Brown almost-linear: ``r_i = x_i + sum x_j - (n + 1)`` (i < n), ``r_n = prod x_j - 1``."""
    n = x.shape[0]
    linear = x[:-1] + torch.sum(x) - (n + 1)
    return torch.cat([linear, (torch.prod(x) - 1).reshape(1)])


def _shift(x: Tensor, by: int) -> Tensor:
    """``x_{i-by}`` with zeros outside (``by=1``: previous entry, ``by=-1``: next entry)."""
    zero = x.new_zeros(1)
    return torch.cat([zero, x[:-1]]) if by == 1 else torch.cat([x[1:], zero])


def discrete_boundary_value(x: Tensor) -> Tensor:
    """(28) Discrete boundary value, h = 1/(n+1), t_i = i h, x_0 = x_{n+1} = 0."""
    n = x.shape[0]
    h = 1 / (n + 1)
    t = _idx(n, x) * h
    return 2 * x - _shift(x, 1) - _shift(x, -1) + h**2 * (x + t + 1) ** 3 / 2


def discrete_integral_equation(x: Tensor) -> Tensor:
    """(29) Discrete integral equation, h = 1/(n+1), t_i = i h."""
    n = x.shape[0]
    h = 1 / (n + 1)
    t = _idx(n, x) * h
    c = (x + t + 1) ** 3
    lower = torch.cumsum(t * c, dim=0)  # sum_{j <= i} t_j c_j
    weighted = (1 - t) * c
    upper = torch.sum(weighted) - torch.cumsum(weighted, dim=0)  # sum_{j > i} (1 - t_j) c_j
    return x + h * ((1 - t) * lower + t * upper) / 2


def broyden_tridiagonal(x: Tensor) -> Tensor:
    """(30) Broyden tridiagonal: ``r_i = (3 - 2 x_i) x_i - x_{i-1} - 2 x_{i+1} + 1``."""
    return (3 - 2 * x) * x - _shift(x, 1) - 2 * _shift(x, -1) + 1


def broyden_banded(x: Tensor, lower: int = 5, upper: int = 1) -> Tensor:
    """(31) Broyden banded: ``r_i = x_i (2 + 5 x_i^2) + 1 - sum_{j in J_i} x_j (1 + x_j)``,
    J_i = {j != i : i - 5 <= j <= i + 1}."""
    n = x.shape[0]
    i = torch.arange(n, device=x.device)
    offset = i[None, :] - i[:, None]
    band = ((offset >= -lower) & (offset <= upper) & (offset != 0)).to(x.dtype)
    return x * (2 + 5 * x**2) + 1 - band @ (x * (1 + x))


def linear_full_rank(x: Tensor, m: int = 20) -> Tensor:
    """(32) Linear function, full rank: ``r_i = x_i - 2/m sum x_j - 1`` (i <= n), then
    ``-2/m sum x_j - 1``. The minimum is m - n at x = -1."""
    n = x.shape[0]
    s = 2 * torch.sum(x) / m
    return torch.cat([x - s - 1, (-s - 1).expand(m - n)])


def chebyquad(x: Tensor, m: int | None = None) -> Tensor:
    """(35) Chebyquad: ``r_i = mean_j T_i(x_j) - int_0^1 T_i``, T_i the shifted Chebyshev
    polynomials on [0, 1]; the integral is 0 for odd i and -1/(i^2 - 1) for even i."""
    m = x.shape[0] if m is None else m
    y = 2 * x - 1
    previous, current = torch.ones_like(x), y
    rows = []
    for i in range(1, m + 1):
        integral = -1 / (i**2 - 1) if i % 2 == 0 else 0.0
        rows.append(torch.mean(current) - integral)
        previous, current = current, 2 * y * current - previous
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# The registry: (name, residual_fn, x0, f_opt). f_opt is MGH's stated minimum of sum r^2.
# ---------------------------------------------------------------------------------------------


def _t(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _x0_boundary(n: int) -> Tensor:
    t = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
    return t * (t - 1)


_SPECS: list[tuple[str, Callable[[Tensor], Tensor], Tensor, float | None]] = [
    ("rosenbrock", rosenbrock, _t([-1.2, 1.0]), 0.0),
    ("freudenstein_roth", freudenstein_roth, _t([0.5, -2.0]), 0.0),
    ("powell_badly_scaled", powell_badly_scaled, _t([0.0, 1.0]), 0.0),
    ("brown_badly_scaled", brown_badly_scaled, _t([1.0, 1.0]), 0.0),
    ("beale", beale, _t([1.0, 1.0]), 0.0),
    ("jennrich_sampson", jennrich_sampson, _t([0.3, 0.4]), 124.362),
    ("helical_valley", helical_valley, _t([-1.0, 0.0, 0.0]), 0.0),
    ("bard", bard, _t([1.0, 1.0, 1.0]), 8.21487e-3),
    ("gaussian", gaussian, _t([0.4, 1.0, 0.0]), 1.12793e-8),
    ("meyer", meyer, _t([0.02, 4000.0, 250.0]), 87.9458),
    ("gulf", gulf, _t([5.0, 2.5, 0.15]), 0.0),
    ("box_3d", box_3d, _t([0.0, 10.0, 20.0]), 0.0),
    ("powell_singular", powell_singular, _t([3.0, -1.0, 0.0, 1.0]), 0.0),
    ("wood", wood, _t([-3.0, -1.0, -3.0, -1.0]), 0.0),
    ("kowalik_osborne", kowalik_osborne, _t([0.25, 0.39, 0.415, 0.39]), 3.07505e-4),
    ("brown_dennis", brown_dennis, _t([25.0, 5.0, -5.0, -1.0]), 85822.2),
    ("osborne1", osborne1, _t([0.5, 1.5, -1.0, 0.01, 0.02]), 5.46489e-5),
    ("biggs_exp6", biggs_exp6, _t([1.0, 2.0, 1.0, 1.0, 1.0, 1.0]), 0.0),
    (
        "osborne2",
        osborne2,
        _t([1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5]),
        4.01377e-2,
    ),
    ("watson", watson, torch.zeros(6, dtype=torch.float64), 2.28767e-3),
    ("extended_rosenbrock", extended_rosenbrock, _t([-1.2, 1.0] * 5), 0.0),
    ("extended_powell", extended_powell, _t([3.0, -1.0, 0.0, 1.0] * 3), 0.0),
    ("penalty1", penalty1, torch.arange(1, 11, dtype=torch.float64), 7.08765e-5),
    ("penalty2", penalty2, torch.full((10,), 0.5, dtype=torch.float64), 2.93660e-4),
    (
        "variably_dimensioned",
        variably_dimensioned,
        1 - torch.arange(1, 11, dtype=torch.float64) / 10,
        0.0,
    ),
    ("trigonometric", trigonometric, torch.full((10,), 0.1, dtype=torch.float64), 0.0),
    ("brown_almost_linear", brown_almost_linear, torch.full((10,), 0.5, dtype=torch.float64), 0.0),
    ("discrete_boundary_value", discrete_boundary_value, _x0_boundary(10), 0.0),
    ("discrete_integral_equation", discrete_integral_equation, _x0_boundary(10), 0.0),
    ("broyden_tridiagonal", broyden_tridiagonal, torch.full((10,), -1.0, dtype=torch.float64), 0.0),
    ("broyden_banded", broyden_banded, torch.full((10,), -1.0, dtype=torch.float64), 0.0),
    ("linear_full_rank", linear_full_rank, torch.ones(10, dtype=torch.float64), 10.0),
    ("chebyquad", chebyquad, torch.arange(1, 9, dtype=torch.float64) / 9, 3.51687e-3),
]


def _sum_of_squares(residual_fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        r = residual_fn(x)
        return torch.sum(r * r)

    fn.__name__ = f"{residual_fn.__name__}_sum_of_squares"
    fn.__doc__ = f"sum(r(x)**2) for r = {residual_fn.__name__} (MGH's f)."
    return fn


def _build() -> tuple[dict[str, LSProblem], dict[str, Problem]]:
    ls, unc = {}, {}
    for name, residual_fn, x0, f_opt in _SPECS:
        m = int(residual_fn(x0).shape[0])
        n = int(x0.shape[0])
        ls[name] = LSProblem(name, m, n, residual_fn, x0, f_opt)
        unc[name] = Problem(name, n, _sum_of_squares(residual_fn), x0, f_opt)
    return ls, unc


LEAST_SQUARES, UNCONSTRAINED = _build()


class ScipyFuncs(NamedTuple):
    """numpy callables for ``scipy.optimize`` (float64, via torch autograd)."""

    fun: Callable[[np.ndarray], float]
    jac: Callable[[np.ndarray], np.ndarray]
    hess: Callable[[np.ndarray], np.ndarray]
    hessp: Callable[[np.ndarray, np.ndarray], np.ndarray]


def scipy_funcs(problem: Problem | LSProblem) -> ScipyFuncs:
    """``fun``, ``jac``, ``hess`` and ``hessp`` of ``problem``'s ``f`` (MGH's sum of squares)
    for ``scipy.optimize.minimize``, evaluated with torch autograd in float64."""
    fn = problem.fn if isinstance(problem, Problem) else _sum_of_squares(problem.residual_fn)

    def as_tensor(x) -> Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64)

    def fun(x):
        return float(fn(as_tensor(x)))

    def jac(x):
        return torch.func.grad(fn)(as_tensor(x)).numpy()

    def hess(x):
        return torch.func.hessian(fn)(as_tensor(x)).numpy()

    def hessp(x, p):
        return torch.func.jvp(torch.func.grad(fn), (as_tensor(x),), (as_tensor(p),))[1].numpy()

    return ScipyFuncs(fun, jac, hess, hessp)
