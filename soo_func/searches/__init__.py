"""Line searches and trust regions: they turn a direction into a step.

``acceptance`` holds the gain-ratio and radius rules shared by ``trust_region`` and
Levenberg(-Marquardt); ``damped_gauss_newton`` the damped model and its dense and CG
solvers; ``damping`` and ``more_radius`` the rules that move Levenberg's damping.
"""

from soo_func.searches.armijo import armijo, armijo_sync_free
from soo_func.searches.levenberg import (
    LevenbergOptions,
    LevenbergState,
    levenberg,
    levenberg_marquardt,
    levenberg_mode,
)
from soo_func.searches.line import LineSearchState
from soo_func.searches.trust_region import TrustRegionState, trust_region
from soo_func.searches.wolfe import wolfe

__all__ = [
    "LevenbergOptions",
    "LevenbergState",
    "LineSearchState",
    "TrustRegionState",
    "armijo",
    "armijo_sync_free",
    "levenberg",
    "levenberg_marquardt",
    "levenberg_mode",
    "trust_region",
    "wolfe",
]
