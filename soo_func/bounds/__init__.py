"""Box-bounded optimization: :func:`lbfgs_b`, :func:`trust_region_reflective` (least
squares) and the box helpers."""

from soo_func.bounds.box import Box, active_bounds, flat_box, project_to_bounds
from soo_func.bounds.lbfgsb import LbfgsbState, lbfgs_b
from soo_func.bounds.least_squares import ReflectiveState, trust_region_reflective

__all__ = [
    "Box",
    "LbfgsbState",
    "ReflectiveState",
    "active_bounds",
    "flat_box",
    "lbfgs_b",
    "project_to_bounds",
    "trust_region_reflective",
]
