"""Properties over random convex quadratics and linear least-squares problems (hypothesis).

Problems (dims 1-20, condition number ``kappa`` up to 1e6, float32 and float64):

* ``f(x) = 0.5 x^T A x - b^T x`` with ``A = Q diag(lambda) Q^T``, eigenvalues log-spaced
  in ``[lambda_min, kappa lambda_min]``; minimizer ``x* = A^{-1} b``;
* ``r(x) = J x - y`` with ``J = U diag(sigma) V^T`` (``m = n + 3`` rows), singular values
  in ``[sigma_min, sqrt(kappa) sigma_min]`` (``J^T J`` has condition ``kappa``);
  ``x* = J^+ y``, gradient ``J^T r``, ``lambda_min = sigma_min^2``.

Every direction runs with its natural search and every direction that publishes a model
with ``trust_region``. Each run must stop in ``MAX_STEPS`` steps (``max_steps`` is a
failure) on one of the documented reasons:

* ``gtol``: ``||g||_inf <= gtol``. For a convex quadratic ``x - x* = A^{-1} g``, so
  ``||x - x*|| <= ||g|| / lambda_min``; the test asserts
  ``||x - x*|| <= 2 ||g|| / lambda_min + ROUND``, the factor 2 for the rounding of ``g``
  itself, where ``ROUND = 10 sqrt(n) eps kappa ||x*||`` is the rounding of ``x*`` in the
  dtype (a backward-stable solve's forward error).
* ``search_failed`` ("the point cannot be improved at this precision"): honest only at
  the rounding floor of a search that judges steps by ``f``. From a point with gradient
  ``g`` the best decrease is ``0.5 g^T A^{-1} g >= ||g||^2 / (2 lambda_max)``, invisible
  once below the rounding ``eps |f*|`` of ``f``: the test asserts
  ``||g||_inf <= 10 max(gtol, sqrt(2 lambda_max eps |f*|))`` and the same bound. The
  driver's ``stalled`` (ten steps in a row that lower ``f`` by no more than its rounding
  and do not halve ``||g||_inf``) is the same floor reached without a failed search, and
  is held to the same bound. Which of the three a float32 run ends on can change with the
  BLAS thread count; the bounds do not.

``gtol`` is set per problem above the rounding floor of the gradient in the dtype:
``gtol = max(1e-9 scale, 100 eps (lambda_max ||x*||_inf + ||b||_inf))``, where ``scale``
is the gradient's size at the start (a float32 gradient cannot be computed more exactly
than ``eps lambda_max ||x*||``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import soo_func as sf

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

MAX_STEPS = 3000
# derandomize: CI sees the same examples every run; no shrinking (a failure reports the
# generated example as it is), which keeps the module fast.
SETTINGS = settings(
    max_examples=7,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)


def _problems(max_log_kappa: float):
    return st.tuples(
        st.integers(1, 20),  # dimension
        st.floats(0.0, max_log_kappa),  # log10 of the condition number
        st.sampled_from([torch.float32, torch.float64]),
        st.integers(0, 2**31 - 1),  # seed
        st.floats(-2.0, 2.0),  # log10 of lambda_min (the problem's scale)
    )


PROBLEMS = _problems(6.0)
#: Broyden's (good, nonsymmetric) update on an ill-conditioned quadratic converges in
#: hundreds to thousands of steps along a rounding-chaotic path: on the float64 n=20
#: kappa=3.5e4 example, x0 perturbed by 1e-13 relative in 6 ways, broyden+wolfe ended in a
#: search failure up to 25x above gtol 3 times and broyden+trust_region at max_steps once
#: (with either update order; whether the unperturbed start passes is a coin flip of the
#: rounding). Its families are asserted where the property is robust: kappa <= 1e3.
WELL_CONDITIONED = _problems(3.0)
CHAOTIC_WHEN_ILL_CONDITIONED = ("broyden+wolfe", "broyden+trust_region")


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


class Case:
    """One random problem in float64 (exact reference) and its dtype (the run)."""

    def __init__(self, spec, least_squares: bool):
        n, log_kappa, dtype, seed, log_scale = spec
        gen = torch.Generator().manual_seed(seed)
        self.n, self.dtype, self.kappa = n, dtype, 10.0**log_kappa
        self.lambda_min = 10.0**log_scale
        spread = torch.logspace(0, log_kappa, n, dtype=torch.float64)
        spread = spread[torch.randperm(n, generator=gen)]
        if least_squares:
            m = n + 3
            u = _orthogonal(m, gen)[:, :n]
            sigma = math.sqrt(self.lambda_min) * spread.sqrt()
            self.jac = u @ torch.diag(sigma) @ _orthogonal(n, gen).T
            self.y = torch.randn(m, generator=gen, dtype=torch.float64)
            self.hess = self.jac.T @ self.jac
            self.rhs = self.jac.T @ self.y
        else:
            q = _orthogonal(n, gen)
            self.hess = q @ torch.diag(self.lambda_min * spread) @ q.T
            self.rhs = torch.randn(n, generator=gen, dtype=torch.float64)
        self.x_star = torch.linalg.solve(self.hess, self.rhs)
        self.x0 = torch.randn(n, generator=gen, dtype=torch.float64)
        eps = torch.finfo(dtype).eps
        lambda_max = self.kappa * self.lambda_min
        floor = (
            100 * eps * (lambda_max * float(self.x_star.abs().max()) + float(self.rhs.abs().max()))
        )
        start_grad = float((self.hess @ self.x0 - self.rhs).abs().max())
        self.gtol = max(1e-9 * start_grad, floor)
        self.round = 10 * math.sqrt(n) * eps * self.kappa * float(self.x_star.norm())
        f_star = abs(float(self.x_star @ self.rhs)) / 2 + (
            0.5 * float(self.y @ self.y) if least_squares else 0.0
        )
        self.value_floor = math.sqrt(2 * lambda_max * eps * f_star)

    def params(self) -> dict[str, torch.Tensor]:
        return {"x": self.x0.to(self.dtype)}

    def value_fn(self) -> Callable:
        a, b = self.hess.to(self.dtype), self.rhs.to(self.dtype)
        return lambda p: 0.5 * p["x"] @ (a @ p["x"]) - b @ p["x"]

    def residual_fn(self) -> Callable:
        j, y = self.jac.to(self.dtype), self.y.to(self.dtype)
        return lambda p: j @ p["x"] - y

    def check(self, result: sf.MinimizeResult, label: str) -> None:
        x = result.params["x"].double()
        g = self.hess @ x - self.rhs  # the exact gradient at the returned point
        where = (
            f"{label}: n={self.n} kappa={self.kappa:.3g} lambda_min={self.lambda_min:.3g} "
            f"{self.dtype} reason={result.reason!r} steps={result.num_steps} "
            f"|g|_inf={float(g.abs().max()):.3g} gtol={self.gtol:.3g}"
        )
        assert result.reason != "max_steps", where
        if result.reason.startswith(("search_failed", "stalled")):
            assert float(g.abs().max()) <= 10 * max(self.gtol, self.value_floor), where
        else:
            assert result.reason == "gtol", where
        error = float((x - self.x_star).norm())
        bound = 2 * float(g.norm()) / self.lambda_min + self.round
        assert error <= bound, f"{where} |x - x*|={error:.3g} > {bound:.3g}"


MINIMIZE = {
    "lbfgs+wolfe": lambda: sf.chain(sf.lbfgs(), sf.wolfe()),
    "bfgs+wolfe": lambda: sf.chain(sf.bfgs(), sf.wolfe()),
    "dfp+wolfe": lambda: sf.chain(sf.dfp(), sf.wolfe()),
    "broyden+wolfe": lambda: sf.chain(sf.broyden(), sf.wolfe()),
    "ssbfgs+wolfe": lambda: sf.chain(sf.ssbfgs(), sf.wolfe()),
    "ssbfgs(memory_size=5)+wolfe": lambda: sf.chain(sf.ssbfgs(memory_size=5), sf.wolfe()),
    "ssbroyden+wolfe": lambda: sf.chain(sf.ssbroyden(), sf.wolfe()),
    "newton_krylov+armijo": lambda: sf.chain(sf.newton_krylov(), sf.armijo()),
    # wolfe(c2=0.1), as nonlinear_cg's docstring and N&W (sec. 5.2) prescribe for CG: with the
    # quasi-Newton default c2 = 0.9, PR+ can take a direction at cos 0.04 to -g whose best
    # decrease is below the search's rounding (float32 n=9 kappa=591: search_failed at |g| 0.18).
    "nonlinear_cg+wolfe": lambda: sf.chain(sf.nonlinear_cg(), sf.wolfe(c2=0.1)),
    "sr1+trust_region": lambda: sf.chain(sf.sr1(), sf.trust_region()),
    "lbfgs+trust_region": lambda: sf.chain(sf.lbfgs(), sf.trust_region()),
    "bfgs+trust_region": lambda: sf.chain(sf.bfgs(), sf.trust_region()),
    "dfp+trust_region": lambda: sf.chain(sf.dfp(), sf.trust_region()),
    "broyden+trust_region": lambda: sf.chain(sf.broyden(), sf.trust_region()),
    "newton_krylov+trust_region": lambda: sf.chain(sf.newton_krylov(), sf.trust_region()),
}

LEAST_SQUARES = {
    "gauss_newton+armijo": lambda: sf.chain(sf.gauss_newton(), sf.armijo()),
    "levenberg_marquardt": lambda: sf.levenberg_marquardt(),
    "gauss_newton+trust_region": lambda: sf.chain(sf.gauss_newton(), sf.trust_region()),
}

#: Families with a defect outside the trust region found by these properties (reported to
#: the lead; strict, so a fix shows up as an XPASS to remove here).
KNOWN_DEFECTS: dict[str, str] = {}


def _marked(families: dict) -> list:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DEFECTS[name]))
        if name in KNOWN_DEFECTS
        else name
        for name in families
    ]


@pytest.mark.parametrize(
    "family", _marked({k: v for k, v in MINIMIZE.items() if k not in CHAOTIC_WHEN_ILL_CONDITIONED})
)
def test_quadratic_minimizer_reached_or_honest_stop(family):
    @SETTINGS
    @given(PROBLEMS)
    def run(spec):
        case = Case(spec, least_squares=False)
        result = sf.minimize(
            case.value_fn(), case.params(), MINIMIZE[family](), max_steps=MAX_STEPS, gtol=case.gtol
        )
        case.check(result, family)

    run()


@pytest.mark.parametrize("family", CHAOTIC_WHEN_ILL_CONDITIONED)
def test_broyden_quadratic_minimizer_reached_or_honest_stop(family):
    """The property above on :data:`WELL_CONDITIONED` problems (kappa <= 1e3)."""

    @SETTINGS
    @given(WELL_CONDITIONED)
    def run(spec):
        case = Case(spec, least_squares=False)
        result = sf.minimize(
            case.value_fn(), case.params(), MINIMIZE[family](), max_steps=MAX_STEPS, gtol=case.gtol
        )
        case.check(result, family)

    run()


@pytest.mark.parametrize("family", _marked(LEAST_SQUARES))
def test_least_squares_minimizer_reached_or_honest_stop(family):
    @SETTINGS
    @given(PROBLEMS)
    def run(spec):
        case = Case(spec, least_squares=True)
        result = sf.least_squares(
            case.residual_fn(), case.params(), LEAST_SQUARES[family](), max_steps=MAX_STEPS,
            gtol=case.gtol,
        )  # fmt: skip
        case.check(result, family)

    run()
