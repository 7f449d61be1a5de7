"""Direction transforms: each maps the gradient to a descent direction ``d``."""

from soo_func.directions.gauss_newton import gauss_newton
from soo_func.directions.lbfgs import lbfgs
from soo_func.directions.newton import newton_krylov
from soo_func.directions.nonlinear_cg import nonlinear_cg
from soo_func.directions.quasi_newton import bfgs, broyden, dfp, sr1
from soo_func.directions.self_scaled import ssbfgs, ssbroyden

__all__ = [
    "bfgs",
    "broyden",
    "dfp",
    "gauss_newton",
    "lbfgs",
    "newton_krylov",
    "nonlinear_cg",
    "sr1",
    "ssbfgs",
    "ssbroyden",
]
