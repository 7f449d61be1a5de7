"""The tangent of a path of minimizers: :func:`path_tangent`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func as tf

from soo_func import tree
from soo_func.continuation.follower import raw_objective
from soo_func.krylov import minres
from soo_func.oracles import charge, hvp

PyTree = Any

__all__ = ["path_tangent"]


def path_tangent(
    family_fn: Callable[[PyTree, torch.Tensor], torch.Tensor],
    x: PyTree,
    t: torch.Tensor,
    *,
    rtol: float = 1e-8,
    max_iters: int | None = None,
) -> PyTree:
    """The tangent ``dx/dt = -(d^2 f_t/dx^2)^{-1} d/dt grad f_t`` of the path at ``(x, t)``.

    Implicit differentiation of ``grad_x f_t(x(t)) = 0`` (Allgower & Georg eq. (2.1.9)):
    ``d/dt grad f_t`` is one ``jvp`` of ``grad_x f_t`` in ``t``; the Hessian solve is
    MINRES (Paige & Saunders 1975) on Hessian-vector products of ``f_t``. When
    ``family_fn`` is a :class:`~soo_func.CountedObjective` the ``jvp`` and each product
    are charged to it as Hessian products.
    """
    raw = raw_objective(family_fn)
    t = torch.as_tensor(t, dtype=tree.leaves(x)[0].dtype, device=tree.leaves(x)[0].device)

    def grad_at(s):
        return tf.grad(lambda p: raw(p, s))(x)

    _, dgrad_dt = tf.jvp(grad_at, (t,), (torch.ones_like(t),))
    # forward AD through Python-scalar products can promote float32 tangents to float64
    dgrad_dt = tree.map_leaves(lambda d, p: d.to(p.dtype), dgrad_dt, x)
    charge(family_fn, hvp=1)

    def objective_t(p):
        return raw(p, t)

    def matvec(v):
        charge(family_fn, hvp=1)
        return tree.map_leaves(lambda hv, p: hv.to(p.dtype), hvp(objective_t, x, v), x)

    n = sum(leaf.numel() for leaf in tree.leaves(x))
    iters = max_iters if max_iters is not None else min(2 * n, 200)
    return minres(matvec, tree.neg(dgrad_dt), max_iters=iters, rtol=rtol).x
