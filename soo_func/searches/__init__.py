"""Line searches and trust regions: they turn a direction into a step."""

from soo_func.searches.armijo import armijo
from soo_func.searches.line import LineSearchState
from soo_func.searches.wolfe import wolfe

__all__ = ["LineSearchState", "armijo", "wolfe"]
