"""NIST StRD nonlinear regression problems with certified values.

Source: NIST Statistical Reference Datasets, Nonlinear Regression
(https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml). Each problem fits
``y = f(x; b) + e`` and carries the two certified starting points ("Start 1", far, and
"Start 2", near), the certified parameters (11 significant digits) and the certified
residual sum of squares. The residuals are ``y - f(x; b)`` and the least-squares loss
``0.5 * sum(r**2)`` (so ``certified_rss`` is ``2 * loss`` at the certified params).

``tests/test_nist.py`` checks every entry independently: the certified parameters are
a stationary point of the data written here, their residual sum of squares is the
certified one, and scipy's MINPACK ``lm`` run from the certified values stays there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["NIST", "NISTProblem"]


@dataclass(frozen=True)
class NISTProblem:
    """One NIST StRD nonlinear regression problem.

    ``model(b, x)`` evaluates the fitted curve for the parameter vector ``b`` (1-D
    tensor) at the predictor values ``x``; ``residual_fn(b) = y - model(b, x)``.
    """

    name: str
    difficulty: str
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: tuple[float, ...]
    y: tuple[float, ...]
    start1: tuple[float, ...]
    start2: tuple[float, ...]
    certified_params: tuple[float, ...]
    certified_rss: float

    @property
    def n(self) -> int:
        """The number of parameters."""
        return len(self.certified_params)

    @property
    def m(self) -> int:
        """The number of observations (residuals)."""
        return len(self.y)

    def data(self, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` as tensors."""
        x = torch.tensor(self.x, dtype=dtype, device=device)
        y = torch.tensor(self.y, dtype=dtype, device=device)
        return x, y

    def residual_fn(
        self, dtype=torch.float64, device=None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``b -> y - model(b, x)`` with the data in ``dtype`` on ``device``."""
        x, y = self.data(dtype, device)

        def residuals(b: torch.Tensor) -> torch.Tensor:
            return y - self.model(b, x)

        return residuals

    def starts(self, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two certified starting points (Start 1, Start 2)."""
        return (
            torch.tensor(self.start1, dtype=dtype, device=device),
            torch.tensor(self.start2, dtype=dtype, device=device),
        )

    def certified(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """The certified parameter values."""
        return torch.tensor(self.certified_params, dtype=dtype, device=device)


def _misra1a(b, x):
    return b[0] * (1 - torch.exp(-b[1] * x))


def _misra1b(b, x):
    return b[0] * (1 - (1 + b[1] * x / 2) ** (-2))


def _danwood(b, x):
    return b[0] * x ** b[1]


def _rat42(b, x):
    return b[0] / (1 + torch.exp(b[1] - b[2] * x))


def _rat43(b, x):
    return b[0] / (1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3])


def _mgh09(b, x):
    return b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3])


def _mgh10(b, x):
    return b[0] * torch.exp(b[1] / (x + b[2]))


def _eckerle4(b, x):
    return (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2)


_MISRA_X = (77.6, 114.9, 141.1, 190.8, 239.9, 289.0, 332.8, 378.4, 434.8, 477.3, 536.8, 593.1, 689.1, 760.0)  # fmt: skip
_MISRA_Y = (10.07, 14.73, 17.94, 23.93, 29.61, 35.18, 40.02, 44.82, 50.76, 55.05, 61.01, 66.40, 75.47, 81.78)  # fmt: skip

_PROBLEMS = [
    NISTProblem(
        name="Misra1a",
        difficulty="lower",
        model=_misra1a,
        x=_MISRA_X,
        y=_MISRA_Y,
        start1=(500.0, 1e-4),
        start2=(250.0, 5e-4),
        certified_params=(2.3894212918e02, 5.5015643181e-04),
        certified_rss=1.2455138894e-01,
    ),
    NISTProblem(
        name="DanWood",
        difficulty="lower",
        model=_danwood,
        x=(1.309, 1.471, 1.490, 1.565, 1.611, 1.680),
        y=(2.138, 3.421, 3.597, 4.340, 4.882, 5.660),
        start1=(1.0, 5.0),
        start2=(0.7, 4.0),
        certified_params=(7.6886226176e-01, 3.8604055871e00),
        certified_rss=4.3173084083e-03,
    ),
    NISTProblem(
        name="Misra1b",
        difficulty="average",
        model=_misra1b,
        x=_MISRA_X,
        y=_MISRA_Y,
        start1=(500.0, 1e-4),
        start2=(300.0, 2e-4),
        certified_params=(3.3799746163e02, 3.9039091287e-04),
        certified_rss=7.5464681533e-02,
    ),
    NISTProblem(
        name="BoxBOD",
        difficulty="higher",
        model=_misra1a,
        x=(1.0, 2.0, 3.0, 5.0, 7.0, 10.0),
        y=(109.0, 149.0, 149.0, 191.0, 213.0, 224.0),
        start1=(1.0, 1.0),
        start2=(100.0, 0.75),
        certified_params=(2.1380940889e02, 5.4723748542e-01),
        certified_rss=1.1680088766e03,
    ),
    NISTProblem(
        name="Rat42",
        difficulty="higher",
        model=_rat42,
        x=(9.0, 14.0, 21.0, 28.0, 42.0, 57.0, 63.0, 70.0, 79.0),
        y=(8.930, 10.800, 18.590, 22.330, 39.350, 56.110, 61.730, 64.620, 67.080),
        start1=(100.0, 1.0, 0.1),
        start2=(75.0, 2.5, 0.07),
        certified_params=(7.2462237576e01, 2.6180768402e00, 6.7359200066e-02),
        certified_rss=8.0565229338e00,
    ),
    NISTProblem(
        name="Rat43",
        difficulty="higher",
        model=_rat43,
        x=tuple(float(i) for i in range(1, 16)),
        y=(
            16.08,
            33.83,
            65.80,
            97.20,
            191.55,
            326.20,
            386.87,
            520.53,
            590.03,
            651.92,
            724.93,
            699.56,
            689.96,
            637.56,
            717.41,
        ),
        start1=(100.0, 10.0, 1.0, 1.0),
        start2=(700.0, 5.0, 0.75, 1.3),
        certified_params=(6.9964151270e02, 5.2771253025e00, 7.5962938329e-01, 1.2792483859e00),
        certified_rss=8.7864049080e03,
    ),
    NISTProblem(
        name="MGH09",
        difficulty="higher",
        model=_mgh09,
        x=(4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625),
        y=(
            0.1957,
            0.1947,
            0.1735,
            0.16,
            0.0844,
            0.0627,
            0.0456,
            0.0342,
            0.0323,
            0.0235,
            0.0246,
        ),
        start1=(25.0, 39.0, 41.5, 39.0),
        start2=(0.25, 0.39, 0.415, 0.39),
        certified_params=(1.9280693458e-01, 1.9128232873e-01, 1.2305650693e-01, 1.3606233068e-01),
        certified_rss=3.0750560385e-04,
    ),
    NISTProblem(
        name="MGH10",
        difficulty="higher",
        model=_mgh10,
        x=tuple(50.0 + 5.0 * i for i in range(16)),
        y=(
            34780.0,
            28610.0,
            23650.0,
            19630.0,
            16370.0,
            13720.0,
            11540.0,
            9744.0,
            8261.0,
            7030.0,
            6005.0,
            5147.0,
            4427.0,
            3820.0,
            3307.0,
            2872.0,
        ),
        start1=(2.0, 400000.0, 25000.0),
        start2=(0.02, 4000.0, 250.0),
        certified_params=(5.6096364710e-03, 6.1813463463e03, 3.4522363462e02),
        certified_rss=8.7945855171e01,
    ),
    NISTProblem(
        name="Eckerle4",
        difficulty="higher",
        model=_eckerle4,
        x=(
            400.0,
            405.0,
            410.0,
            415.0,
            420.0,
            425.0,
            430.0,
            435.0,
            436.5,
            438.0,
            439.5,
            441.0,
            442.5,
            444.0,
            445.5,
            447.0,
            448.5,
            450.0,
            451.5,
            453.0,
            454.5,
            456.0,
            457.5,
            459.0,
            460.5,
            462.0,
            463.5,
            465.0,
            470.0,
            475.0,
            480.0,
            485.0,
            490.0,
            495.0,
            500.0,
        ),
        y=(
            0.0001575,
            0.0001699,
            0.0002350,
            0.0003102,
            0.0004917,
            0.0008710,
            0.0017418,
            0.0046400,
            0.0065895,
            0.0097302,
            0.0149002,
            0.0237310,
            0.0401683,
            0.0712559,
            0.1264458,
            0.2073413,
            0.2902366,
            0.3445623,
            0.3698049,
            0.3668534,
            0.3106727,
            0.2078154,
            0.1164354,
            0.0616764,
            0.0337200,
            0.0194023,
            0.0117831,
            0.0074357,
            0.0022732,
            0.0008800,
            0.0004579,
            0.0002345,
            0.0001586,
            0.0001143,
            0.0000710,
        ),
        start1=(1.0, 10.0, 500.0),
        start2=(1.5, 5.0, 450.0),
        certified_params=(1.5543827178e00, 4.0888321754e00, 4.5154121844e02),
        certified_rss=1.4635887487e-03,
    ),
]

#: The shipped problems by name.
NIST: dict[str, NISTProblem] = {p.name: p for p in _PROBLEMS}


def positivity_bounds(
    problem: NISTProblem, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lower, upper)``: ``b_i >= 0`` where the certified ``b_i`` is positive (no other
    bound): bounds a fit of these models would carry, inactive at the certified optimum."""
    certified = problem.certified(dtype)
    lower = torch.where(certified > 0, 0.0, -torch.inf).to(dtype)
    return lower, torch.full_like(lower, torch.inf)


def optimum_cut_bounds(
    problem: NISTProblem, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`positivity_bounds` and an upper bound ``0.9 * b_0`` on the first parameter
    (positive in every problem here), which cuts the certified optimum: the bound is active
    at the bounded minimizer."""
    lower, upper = positivity_bounds(problem, dtype)
    upper = upper.clone()
    upper[0] = 0.9 * problem.certified_params[0]
    return lower, upper
