"""soo_func: functional second-order optimization for PyTorch.

Every optimizer is a :class:`Transform` (``init``, ``update``) over parameter pytrees,
composed with :func:`chain` like optax::

    opt = sf.chain(sf.lbfgs(), sf.wolfe())
    result = sf.minimize(loss_fn, params, opt)
"""

from soo_func import distributed, implicit, krylov, serialization, stochastic, tree
from soo_func.base import (
    ChainState,
    EmptyState,
    Transform,
    apply_updates,
    chain,
    publish,
    require_extras,
    scale,
    sgd,
    stateless,
    update_and_publish,
)
from soo_func.bounds import active_bounds, lbfgs_b, project_to_bounds, trust_region_reflective
from soo_func.continuation import (
    ArclengthState,
    HomotopyState,
    arclength_homotopy,
    homotopy,
    path_tangent,
    reset_at_stage_change,
)
from soo_func.directions import bfgs, broyden, dfp, lbfgs, sr1
from soo_func.directions.gauss_newton import gauss_newton
from soo_func.directions.newton import newton_krylov
from soo_func.directions.nonlinear_cg import nonlinear_cg
from soo_func.directions.self_scaled import ssbfgs, ssbroyden
from soo_func.drivers import (
    MinimizeResult,
    PathResult,
    batched_least_squares,
    batched_minimize,
    continuation_path,
    least_squares,
    minimize,
)
from soo_func.module_loss import ImpureModuleError
from soo_func.oracles import (
    CountedObjective,
    functional_loss,
    ggn_vp,
    hvp,
    linearize_grad,
    value_and_grad,
)
from soo_func.schedules import ScaleByScheduleState, cosine_decay_schedule, scale_by_schedule
from soo_func.searches import (
    LineSearchState,
    armijo,
    armijo_sync_free,
    levenberg,
    levenberg_marquardt,
    levenberg_mode,
    trust_region,
    wolfe,
)
from soo_func.stochastic import hessian_free, multi_batch_lbfgs, training
from soo_func.stochastic.training import bind_batch, training_step

__version__ = "0.1.0"

__all__ = [
    "ArclengthState",
    "ChainState",
    "CountedObjective",
    "EmptyState",
    "HomotopyState",
    "ImpureModuleError",
    "LineSearchState",
    "MinimizeResult",
    "PathResult",
    "ScaleByScheduleState",
    "Transform",
    "active_bounds",
    "apply_updates",
    "arclength_homotopy",
    "armijo",
    "armijo_sync_free",
    "batched_least_squares",
    "batched_minimize",
    "bfgs",
    "bind_batch",
    "broyden",
    "chain",
    "continuation_path",
    "cosine_decay_schedule",
    "dfp",
    "distributed",
    "functional_loss",
    "gauss_newton",
    "ggn_vp",
    "hessian_free",
    "homotopy",
    "hvp",
    "implicit",
    "krylov",
    "lbfgs",
    "lbfgs_b",
    "least_squares",
    "levenberg",
    "levenberg_marquardt",
    "levenberg_mode",
    "linearize_grad",
    "minimize",
    "multi_batch_lbfgs",
    "newton_krylov",
    "nonlinear_cg",
    "path_tangent",
    "project_to_bounds",
    "publish",
    "require_extras",
    "reset_at_stage_change",
    "scale",
    "scale_by_schedule",
    "serialization",
    "sgd",
    "sr1",
    "ssbfgs",
    "ssbroyden",
    "stateless",
    "stochastic",
    "training",
    "training_step",
    "tree",
    "trust_region",
    "trust_region_reflective",
    "update_and_publish",
    "value_and_grad",
    "wolfe",
]
