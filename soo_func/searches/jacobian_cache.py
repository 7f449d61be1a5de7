"""The dense Levenberg-Marquardt Jacobian cache, keyed on the point and the residual function.

The dense solver evaluates ``J`` and ``r`` at each trial point (they give the trial's value
``0.5 |r|^2`` and gradient ``J^T r``) and keeps them: after an accepted step the next update
starts at that trial point, after a rejected one at the old point, and neither needs a new
Jacobian. The cache is valid only for the same flat point *and* the same residual function:
a training loop that passes a new ``residual_fn`` (another batch) at the same point must get
that function's Jacobian.

A function is identified by a token (:func:`function_token`), not by ``id()``: CPython
reuses the address of a freed closure for the next one (one closure made per batch gets
the same ``id`` every time), while tokens are never reused in a process. They start at a
random offset, so that a state restored in another process does not match that
process's functions. A callable that cannot be weakly referenced or hashed gets a new
token at every call (its Jacobian is never reused: correct, at ``n + 1`` more
evaluations per step).

Where the host may read, :func:`lookup` checks the point and the token; a traced or
vmapped update evaluates and picks by :func:`select_cached`; a caller that promises the
point (the ``continues`` extra) skips both, given a :func:`filled` cache. Under
``torch.compile`` a function has no token (``UNNAMED``): only ``continues`` reuses the cache.
"""

from __future__ import annotations

import itertools
import secrets
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree

PyTree = Any

__all__ = [
    "UNNAMED",
    "JacobianCache",
    "empty_jacobian_cache",
    "filled",
    "function_token",
    "lookup",
    "select_cached",
    "store",
]

_TOKENS: weakref.WeakKeyDictionary[Callable, int] = weakref.WeakKeyDictionary()
_NEXT_TOKEN = itertools.count(1 + secrets.randbelow(2**62))


UNNAMED = -1
"""The token of a function traced by ``torch.compile``: a cache it stored is never looked up
by token (only taken as it is on the caller's promise, ``Point.continues``)."""


def function_token(fn: Callable) -> int:
    """A positive integer naming ``fn`` for as long as it lives (never reused); ``UNNAMED``
    while ``torch.compile`` traces, where a host-side name would be a constant of the graph
    (a recompilation for every new function, and a memo keeping the traced tensors the
    function closes over alive past the graph)."""
    if torch.compiler.is_compiling():
        return UNNAMED
    try:
        token = _TOKENS.get(fn)
        if token is None:
            token = next(_NEXT_TOKEN)
            _TOKENS[fn] = token
        return token
    except TypeError:  # not weakly referenceable, or unhashable: a fresh token each time
        return next(_NEXT_TOKEN)


class JacobianCache(NamedTuple):
    """``jacobian`` (m x n) and ``residuals`` (m) of the residual function with token
    ``of`` (0-d int64; 0: empty) at the flat point ``at`` (n). Empty tensors before the
    first dense update."""

    jacobian: torch.Tensor
    residuals: torch.Tensor
    at: torch.Tensor
    of: torch.Tensor


def empty_jacobian_cache(params: PyTree) -> JacobianCache:
    """An empty cache with the params' dtype and device."""
    like = tree.leaves(params)[0]
    scalar = {"dtype": like.dtype, "device": like.device}
    return JacobianCache(
        jacobian=torch.zeros((0, 0), **scalar),
        residuals=torch.zeros((0,), **scalar),
        at=torch.zeros((0,), **scalar),
        of=torch.zeros((), dtype=torch.int64, device=like.device),
    )


def filled(cache: JacobianCache, params: PyTree) -> bool:
    """Whether ``cache`` holds a Jacobian for params of this size (shapes only, no read)."""
    n = sum(leaf.numel() for leaf in tree.leaves(params))
    return cache.at.shape == (n,) and cache.jacobian.shape[-1:] == (n,)


def lookup(
    cache: JacobianCache, params: PyTree, token: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(J, r)`` when they are of the function ``token`` at ``params``, else
    ``None``. One host synchronisation."""
    flat = tree.ravel(params).flat
    if cache.at.shape != flat.shape:
        return None
    if bool((cache.of == token) & (cache.at == flat).all()):
        return cache.jacobian, cache.residuals
    return None


def select_cached(
    cache: JacobianCache, params: PyTree, token: int, jac: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached ``(J, r)`` where they belong to ``params`` and ``token``, else the fresh
    ``(jac, r)``, selected by ``torch.where`` (no host read: for traced or vmapped updates,
    which evaluate the Jacobian always; a hit's cached ``J`` is the one the evaluation
    returns at the same point, so the values are the host path's)."""
    flat = tree.ravel(params).flat
    if token == UNNAMED or cache.at.shape != flat.shape or cache.jacobian.shape != jac.shape:
        return jac, r
    hit = (cache.of == token) & (cache.at == flat).all()
    return torch.where(hit, cache.jacobian, jac), torch.where(hit, cache.residuals, r)


def store(
    accepted: torch.Tensor,
    trial: tuple[torch.Tensor, torch.Tensor, PyTree],
    current: tuple[torch.Tensor, torch.Tensor, PyTree],
    token: int,
) -> JacobianCache:
    """The cache after a decision: ``(J, r, point)`` of the trial when ``accepted``, else of
    the current point, for the function ``token``."""
    (trial_jac, trial_r, trial_point), (jac, r, point) = trial, current
    return JacobianCache(
        jacobian=torch.where(accepted, trial_jac, jac),
        residuals=torch.where(accepted, trial_r, r),
        at=tree.ravel(tree.where(accepted, trial_point, point)).flat,
        of=torch.full((), token, dtype=torch.int64, device=r.device),
    )
