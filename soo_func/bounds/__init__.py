"""Box-bounded optimization: :func:`lbfgs_b` and the box helpers."""

from soo_func.bounds.box import Box, active_bounds, flat_box, project_to_bounds
from soo_func.bounds.lbfgsb import LbfgsbState, lbfgs_b

__all__ = ["Box", "LbfgsbState", "active_bounds", "flat_box", "lbfgs_b", "project_to_bounds"]
