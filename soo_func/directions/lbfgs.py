"""L-BFGS: the limited-memory BFGS direction by the two-loop recursion.

Nocedal & Wright (2006), Algorithm 7.4 (two-loop recursion) with the initial matrix
``H0 = gamma I``, ``gamma = s^T y / y^T y`` of the newest pair (eq. 7.20). The kernel is
:func:`~soo_func.directions.compact.two_loop_coefficients` (shared with
``bfgs(memory_size=m)`` and :func:`~soo_func.stochastic.multi_batch_lbfgs.multi_batch_lbfgs`),
on the pair memory of :mod:`soo_func.directions.pair_memory`; the transform is
:func:`~soo_func.directions.limited_memory.limited_memory`.

Cost per update with ``m`` pairs of ``n`` parameters: ``2m`` inner products with ``g``
(two per stored pair), ``2m`` multiply-adds for the result, and
a few ``m x m`` operations; no host synchronisation.
"""

from __future__ import annotations

from soo_func.base import Transform
from soo_func.directions.compact import two_loop_coefficients
from soo_func.directions.limited_memory import LimitedMemoryState, limited_memory
from soo_func.options import check_nonnegative, check_positive

__all__ = ["LimitedMemoryState", "lbfgs", "two_loop_coefficients"]


def lbfgs(
    memory_size: int = 10,
    *,
    curvature_eps: float | None = None,
    initial_scaling: float | None = None,
    first_step_norm: float = 1,
) -> Transform:
    """The L-BFGS direction ``d = -H g`` (N&W Alg. 7.4, with ``H0 = gamma I``, eq. 7.20).

    Args:
      memory_size: how many curvature pairs ``(s, y)`` to keep.
      curvature_eps: a pair is skipped when ``s^T y <= curvature_eps * |s| |y|`` (default:
        the machine epsilon of the params' dtype). A skipped pair still occupies its slot
        (marked invalid) until it leaves the memory.
      initial_scaling: a fixed ``H0 = initial_scaling * I`` instead of eq. 7.20's ``gamma``.
      first_step_norm: ``p`` of the step-length hint ``min(1, 1 / |g|_p)`` that the search
        starts from while the memory is empty (the direction is then ``-g``): ``1``
        (default, as ``torch.optim.LBFGS``) makes the first step ``|g|_2 / |g|_1`` long,
        between ``n^(-1/2)`` and 1, so it shortens with the dimension; ``2`` is a step of
        unit length (scipy's L-BFGS-B; ``bfgs(memory_size=m)`` is this direction with
        ``first_step_norm=2``); ``inf`` the longest, ``|g|_2 / |g|_inf``.

    The incoming ``updates`` are the gradient at ``params``; ``params`` is required. The
    pair ``s = x_k - x_{k-1}``, ``y = g_k - g_{k-1}`` is formed from the params and
    gradient of consecutive calls. When ``-H g`` is not a descent direction the memory is
    cleared and the direction is ``-g``. No host synchronisation: all decisions are masks.
    The state is a :class:`~soo_func.directions.limited_memory.LimitedMemoryState`.

    Publishes ``curvature``: ``v -> B v`` with ``B = H^{-1}`` by the compact BFGS
    formula (Byrd, Nocedal & Schnabel 1994, eq. 2.17), and ``step_hint``.
    """
    if curvature_eps is not None:
        check_nonnegative("lbfgs", "curvature_eps", curvature_eps)
    if initial_scaling is not None:
        check_positive("lbfgs", "initial_scaling", initial_scaling)
    return limited_memory(
        "bfgs",
        memory_size,
        "inverse",
        curvature_eps,
        initial_scaling,
        first_step_norm=first_step_norm,
        who="lbfgs",
    )
