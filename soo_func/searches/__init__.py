"""Line searches and trust regions: they turn a direction into a step."""

from soo_func.searches.armijo import armijo, armijo_sync_free
from soo_func.searches.levenberg import LevenbergState, levenberg, levenberg_marquardt
from soo_func.searches.line import LineSearchState
from soo_func.searches.trust_region import TrustRegionState, trust_region
from soo_func.searches.wolfe import wolfe

__all__ = [
    "LevenbergState",
    "LineSearchState",
    "TrustRegionState",
    "armijo",
    "armijo_sync_free",
    "levenberg",
    "levenberg_marquardt",
    "trust_region",
    "wolfe",
]
