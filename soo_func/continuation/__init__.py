"""Homotopy continuation as a chain member: :func:`homotopy` and its two path followers.

A homotopy replaces the objective ``f`` by a family ``f_t``, ``t`` in ``[0, 1]``, with
``f_1 = f`` and ``f_0`` easy, and follows a path from ``t = 0`` to ``t = 1`` (Allgower &
Georg, *Introduction to Numerical Continuation Methods*, 2003; Nocedal & Wright, 2nd ed.,
section 11.3). The package:

* :mod:`~soo_func.continuation.family` -- the family ``f_t`` (``"keller"``, ``"convex"``
  or a user's ``family(params, t)``), written once: its value and gradient from ``f``'s,
  the exact recovery of ``f`` from ``f_t`` and the Jacobian pieces of its path;
* :mod:`~soo_func.continuation.minimizers` -- :func:`minimizer_homotopy`, the
  predictor-corrector follower of the path of minimizers of ``f_t``;
* :mod:`~soo_func.continuation.arclength` -- :func:`arclength_homotopy`, the
  pseudo-arclength follower of the curve ``grad f_t(x) = 0`` through its folds (with
  :mod:`~soo_func.continuation.curve`, its solves);
* :func:`path_tangent` (the tangent ``dx/dt``) and :func:`reset_at_stage_change` (a
  direction's memory across stage changes).

The driver over a parameter schedule, :func:`~soo_func.drivers.continuation_path`, lives
with the other drivers; nothing here imports the drivers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from soo_func.base import Transform
from soo_func.continuation.arclength import ArclengthState, arclength_homotopy
from soo_func.continuation.family import Anchor, Family, make_family
from soo_func.continuation.follower import Handoff
from soo_func.continuation.minimizers import HomotopyState, minimizer_homotopy
from soo_func.continuation.restart import reset_at_stage_change
from soo_func.continuation.tangent import path_tangent

__all__ = [
    "Anchor",
    "ArclengthState",
    "Family",
    "Handoff",
    "HomotopyState",
    "arclength_homotopy",
    "homotopy",
    "make_family",
    "minimizer_homotopy",
    "path_tangent",
    "reset_at_stage_change",
]


def _keyword_options(follower: Callable) -> frozenset[str]:
    parameters = inspect.signature(follower).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


_FOLLOWERS = {"minimizers": minimizer_homotopy, "arclength": arclength_homotopy}
_OPTIONS = {path: _keyword_options(follower) for path, follower in _FOLLOWERS.items()}


def homotopy(family: Any = None, *, path: str | None = None, **options: Any) -> Transform:
    """Continuation from ``f_0`` to ``f_1 = f``; chain it first, e.g.
    ``chain(homotopy(), newton_krylov(), armijo())``.

    Args:
      family: ``"keller"``, ``"convex"`` or a callable ``family(params, t)`` (minimizer
        path only); ``None``: ``"keller"`` on the arclength path, ``"convex"`` on the
        minimizer path.
      path: ``"arclength"`` (:func:`arclength_homotopy`: Keller's curve by
        pseudo-arclength, after the chain's own descent), ``"minimizers"``
        (:func:`minimizer_homotopy`: the path of minimizers of ``f_t``), or ``None``:
        ``"minimizers"`` when a family or an option of that path only is given (e.g.
        ``schedule``), else ``"arclength"``. So ``homotopy()`` is Keller's curve by
        arclength and ``homotopy("convex")`` the convex family's path of minimizers.
      **options: keyword options of that path's follower (see its docstring); an option
        of the other follower only is a ``ValueError``.

    Needs the extras ``value``, ``grad``, ``value_fn``.
    """
    if path is None:
        minimizer_only = set(options) & (_OPTIONS["minimizers"] - _OPTIONS["arclength"])
        path = "minimizers" if family is not None or minimizer_only else "arclength"
    if path not in _FOLLOWERS:
        raise ValueError(f"homotopy: path must be 'minimizers' or 'arclength', got {path!r}")
    foreign = sorted(set(options) - _OPTIONS[path])
    if foreign:
        raise ValueError(
            f"homotopy: {', '.join(foreign)} do(es) not apply to path={path!r}; its options "
            f"are {', '.join(sorted(_OPTIONS[path]))}"
        )
    if family is None:
        family = "keller" if path == "arclength" else "convex"
    return _FOLLOWERS[path](family, **options)
