"""Direction transforms: each maps the gradient to a descent direction ``d``."""

from soo_func.directions.lbfgs import lbfgs

__all__ = ["lbfgs"]
