"""The checks at the door of every transform: the state it received is one it made, and
the updates are like the params.

:func:`guarded` wraps a transform's ``update`` (and ``publish``) with them; every public
transform of the package is built with it. The checks read metadata only (types, pytree
structure, shapes, dtypes, devices), never a tensor's value: no host sync, so a guarded
transform stays sync-free and traceable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func import tree

PyTree = Any

__all__ = [
    "BOUNDED_INSTEAD",
    "SYNC_FREE_SEARCHES",
    "check_like",
    "check_state",
    "check_transform",
    "check_updates",
    "guarded",
    "refuse_vmap",
]

SYNC_FREE_SEARCHES = (
    "Under vmap use armijo_sync_free() (backtracking decided by masks), trust_region() or "
    "levenberg(), with minimize(..., check_every=None)"
)
"""What a search that decides on the host names instead of itself under ``vmap``."""

BOUNDED_INSTEAD = (
    "The bounded optimizers decide on the host: run the problems in a Python loop, or "
    "bound the params by a change of variables (x = lower + (upper - lower) * "
    "sigmoid(z)) and vmap an unbounded chain"
)
"""What the bounded optimizers name instead of themselves under ``vmap``."""


def check_like(
    updates: PyTree,
    params: PyTree,
    what: str = "updates",
    who: str | None = None,
    reference: str = "params",
) -> None:
    """Structure, shape, dtype and device of ``updates`` must match ``params``.

    Metadata only (no host sync). ``who`` (a transform's name) prefixes the message;
    ``reference`` names what ``params`` is.
    """
    prefix = f"{who}: " if who else ""
    try:
        tree.check_same_structure(params, updates, names=(reference, what))
    except ValueError as error:
        raise ValueError(
            f"{prefix}{what} must be a pytree like the {reference} (the gradient at the "
            f"params, or the direction computed from it), leaf for leaf: {error}"
        ) from None
    for p, u in zip(tree.leaves(params), tree.leaves(updates), strict=True):
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"{prefix}{what} leaves must be tensors, got {type(u).__name__}")
        if p.shape != u.shape:
            raise ValueError(
                f"{prefix}{what} leaf has shape {tuple(u.shape)}, params leaf "
                f"{tuple(p.shape)}: pass the gradient at params, leaf for leaf"
            )
        if p.device != u.device:
            raise ValueError(
                f"{prefix}{what} leaf is on {u.device} but the params leaf is on {p.device}; "
                "move one with .to(device) so that both live on the same device"
            )
        if p.dtype != u.dtype:
            raise TypeError(
                f"{prefix}{what} leaf has dtype {u.dtype} but the params leaf has {p.dtype}; "
                "compute the gradient at the params as they are (do not cast one of them)"
            )


def check_state(who: str, state: Any, expected: type | tuple[type, ...]) -> None:
    """Raise ``TypeError`` unless ``state`` is an ``expected`` state (the one ``who`` makes).

    A state says which transform made it by its type; ``None`` means ``update`` was called
    before ``init``. Metadata only (no host sync).
    """
    if isinstance(state, expected):
        return
    kinds = expected if isinstance(expected, tuple) else (expected,)
    wanted = " or ".join(k.__name__ for k in kinds)
    fix = f"pass the state returned by {who}.init(params) (then the one each update returns)"
    if state is None:
        raise TypeError(f"{who}.update got state=None: call init first; {fix}")
    raise TypeError(
        f"{who} got a state of type {type(state).__name__}, not the {wanted} that {who} "
        f"makes: {fix}. (In a chain, each member gets the state its own init made.)"
    )


def check_transform(who: str, optimizer: Any) -> None:
    """Raise ``TypeError`` unless ``optimizer`` has callable ``init`` and ``update``."""
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return
    raise TypeError(
        f"{who}: optimizer must be a Transform with init and update, e.g. "
        f"sf.chain(sf.lbfgs(), sf.wolfe()); got {type(optimizer).__name__} {optimizer!r:.60} "
        "(call the factory: sf.lbfgs(), not sf.lbfgs)"
    )


def check_updates(who: str, updates: PyTree, params: PyTree = None, like: PyTree = None) -> None:
    """``updates`` must be like ``params`` (when given), else like ``like`` (a pytree the
    transform's state holds in the params' structure; nothing is checked when ``None``)."""
    if params is not None:
        check_like(updates, params, "updates", who=who)
    elif like is not None:
        check_like(updates, like, "updates", who=who, reference="params held by the state")


def refuse_vmap(who: str, reads: str, instead: str) -> None:
    """Raise where ``torch.func.vmap`` runs code that reads a tensor on the host
    (``reads`` says what; ``instead`` names the path that works under vmap): a batched
    tensor has no single value to read. Under ``torch.compile`` the read is a graph break:
    break here, with a message that ``fullgraph=True`` shows instead of dynamo's."""
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(
            msg=f"{who} reads {reads} on the host, a graph break under torch.compile, which "
            f"fullgraph=True refuses: compile without fullgraph=True. What traces whole: "
            f"{instead}"
        )
    if tree.in_vmap():
        raise ValueError(
            f"{who} reads {reads} on the host, which torch.func.vmap cannot do: a batched "
            f"tensor has no single value. {instead}"
        )


def guarded(
    who: str,
    transform: Any,
    state_type: type | tuple[type, ...],
    like: Callable[[Any], PyTree] | None = None,
) -> Any:
    """``transform`` with the checks at its door, made before its ``update`` and ``publish``.

    ``update(updates, state, params=None, **extra)`` first checks that ``state`` is a
    ``state_type`` (:func:`check_state`) and that ``updates`` is like ``params``
    (:func:`check_like`) or, without ``params``, like ``like(state)`` (the params-shaped
    part of the state, when it has one). ``publish`` checks the state. Metadata only: no
    tensor is read on the host, so a guarded transform stays sync-free and traceable.
    """
    inner_update, inner_publish = transform.update, transform.publish
    inner_both = transform.update_and_publish

    def door(updates, state, params):
        check_state(who, state, state_type)
        reference = like(state) if params is None and like is not None else None
        check_updates(who, updates, params, reference)

    def update(updates, state, params=None, **extra):
        door(updates, state, params)
        return inner_update(updates, state, params, **extra)

    def publish(state, params=None, **extra):
        check_state(who, state, state_type)
        return inner_publish(state, params, **extra)

    def update_and_publish(updates, state, params=None, **extra):
        door(updates, state, params)
        return inner_both(updates, state, params, **extra)

    return transform._replace(
        update=update,
        publish=None if inner_publish is None else publish,
        update_and_publish=None if inner_both is None else update_and_publish,
    )
