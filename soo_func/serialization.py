"""States load with ``torch.load``'s default ``weights_only=True``: the state types are
registered here, once, at import.

A state is a pytree of tensors in NamedTuples (and the NamedTuples a state holds: the
pair memory, the Jacobian cache, a homotopy's handoff). ``torch.save`` stores one as
is; ``torch.load`` with ``weights_only=True`` (its default since PyTorch 2.6) rebuilds
only the classes registered with ``torch.serialization.add_safe_globals``. These are
plain data (NamedTuples of tensors, ``None`` and ints), so allowing them runs no code::

    torch.save(state, "state.pt")
    state = torch.load("state.pt")          # weights_only=True: no extra argument
    updates, state = optimizer.update(grad, state, params, ...)
"""

from __future__ import annotations

import torch

from soo_func.base import ChainState, EmptyState, SgdState
from soo_func.bounds.lbfgsb import LbfgsbState
from soo_func.bounds.least_squares import ReflectiveState
from soo_func.continuation.arclength import ArclengthState
from soo_func.continuation.follower import Handoff
from soo_func.continuation.minimizers import HomotopyState
from soo_func.directions.gauss_newton import GaussNewtonState
from soo_func.directions.limited_memory import LimitedMemoryState
from soo_func.directions.newton import NewtonKrylovState
from soo_func.directions.nonlinear_cg import NonlinearCgState
from soo_func.directions.pair_memory import LastPoint, PairMemory
from soo_func.directions.quasi_newton import DenseQuasiNewtonState
from soo_func.directions.self_scaled import SelfScaledState
from soo_func.directions.self_scaled_memory import SelfScaledMemoryState
from soo_func.schedules import ScaleByScheduleState
from soo_func.searches.jacobian_cache import JacobianCache
from soo_func.searches.levenberg import LevenbergState
from soo_func.searches.line import LineSearchState
from soo_func.searches.trust_region import TrustRegionState
from soo_func.stochastic.hessian_free import HessianFreeState
from soo_func.stochastic.multi_batch_lbfgs import MultiBatchLBFGSState

__all__ = ["STATE_TYPES", "register_state_types"]

STATE_TYPES: tuple[type, ...] = (
    ChainState,
    EmptyState,
    SgdState,
    ScaleByScheduleState,
    LimitedMemoryState,
    LbfgsbState,
    ReflectiveState,
    PairMemory,
    LastPoint,
    DenseQuasiNewtonState,
    SelfScaledState,
    SelfScaledMemoryState,
    NewtonKrylovState,
    GaussNewtonState,
    NonlinearCgState,
    LineSearchState,
    TrustRegionState,
    LevenbergState,
    JacobianCache,
    HessianFreeState,
    MultiBatchLBFGSState,
    HomotopyState,
    ArclengthState,
    Handoff,
)
"""Every class a state of this package is built from (a test checks that each
``*State`` NamedTuple of the package is here)."""


def register_state_types() -> None:
    """Allow :data:`STATE_TYPES` in ``torch.load(..., weights_only=True)`` (idempotent)."""
    torch.serialization.add_safe_globals(list(STATE_TYPES))


register_state_types()
