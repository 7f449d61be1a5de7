"""The transform protocol: ``Transform``, ``chain``, ``apply_updates`` and the extras contract.

A :class:`Transform` is a pair of pure functions, as in optax::

    state = t.init(params)
    updates, state = t.update(updates, state, params, **extra)

``extra`` carries what is known at the current point: ``value``, ``grad``, ``value_fn``
and ``residual_fn`` (the driver passes them). A transform that needs one declares it with
:func:`require_extras`, which raises a ``TypeError`` naming the transform and the missing
argument.

Publishing (the channel from upstream to downstream members of a chain)
-----------------------------------------------------------------------
A transform may carry a third, optional function ``publish(state, params, **extra)``
that returns a mapping whose keys are declared, by role, in :mod:`soo_func.publication`
(the model of a direction, a rewritten objective, a search's outcome for the driver,
diagnostics). :func:`update_and_publish` runs a member's ``update`` and then its
``publish`` once, with the member's *new* state, the params and the extras the member
received. :func:`chain` forwards the model and objective entries to the members after
it as extras, and returns everything its members published from its own
``update_and_publish``: the driver calls that once per step and replays nothing.

Transforms written for optax's two-function protocol, with or without ``**extra``,
work as chain members unchanged: they publish nothing, and receive no extras unless
their ``update`` accepts them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from soo_func import publication, tree
from soo_func.checks import check_like, check_state, check_transform, check_updates, guarded
from soo_func.options import check_finite, check_interval, check_positive

PyTree = Any
State = Any

__all__ = [
    "ChainState",
    "EmptyState",
    "Transform",
    "apply_updates",
    "chain",
    "check_like",
    "check_params",
    "check_state",
    "check_transform",
    "check_updates",
    "guarded",
    "publish",
    "require_extras",
    "scale",
    "sgd",
    "stateless",
    "update_and_publish",
]


class Transform(NamedTuple):
    """A pure optimizer component: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``.

    ``publish(state, params, **extra) -> Mapping`` is optional; see the module docstring.
    ``update_and_publish(updates, state, params=None, **extra) -> (updates, state,
    publication)`` is optional too: a composite (:func:`chain`) that gathers its members'
    publications during its update sets it, so that they are computed once.

    ``solves_model``: the transform computes its step from the published model
    (``curvature``) by its own solve and uses the incoming updates only as a warm start
    (:func:`~soo_func.searches.trust_region` with Steihaug-CG). :func:`chain` then passes
    ``model_only=True`` to the members before it, so that a direction whose own solve
    costs curvature products (:func:`~soo_func.directions.newton.newton_krylov`) skips it.
    """

    init: Callable[[PyTree], State]
    update: Callable[..., tuple[PyTree, State]]
    publish: Callable[..., Mapping[str, Any]] | None = None
    update_and_publish: Callable[..., tuple[PyTree, State, dict[str, Any]]] | None = None
    solves_model: bool = False


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class ChainState(NamedTuple):
    """The state of :func:`chain`: one state per member, in order."""

    states: tuple


def require_extras(who: str, extra: Mapping[str, Any], *names: str) -> None:
    """Raise ``TypeError`` naming ``who`` and each of ``names`` missing from ``extra``."""
    missing = [n for n in names if extra.get(n) is None]
    if missing:
        wanted = "; ".join(_extra_hint(n) for n in missing)
        raise TypeError(
            f"{who} needs the keyword argument(s) {', '.join(missing)} in update(): pass "
            f"{wanted}. soo_func.minimize passes them for you."
        )


def _extra_hint(name: str) -> str:
    declared = publication.EXTRAS.get(name)
    return declared.meaning.replace("`", "") if declared is not None else f"{name}=..."


def publish(transform: Transform, state: State, params: PyTree, **extra: Any) -> dict[str, Any]:
    """What ``transform`` publishes at ``state`` (an empty dict for plain optax-style ones).

    For inspecting a state by hand; a chain replays its members here. The drivers use
    :func:`update_and_publish`, which computes each publication once.
    """
    fn = getattr(transform, "publish", None)
    if fn is None:
        return {}
    return dict(fn(state, params, **extra))


def update_and_publish(
    transform: Transform, updates: PyTree, state: State, params: PyTree = None, **extra: Any
) -> tuple[PyTree, State, dict[str, Any]]:
    """``transform.update`` followed by its publication at the new state, computed once.

    Returns ``(updates, state, publication)``; the publication's keys are declared in
    :mod:`soo_func.publication`. A transform whose ``update`` takes no ``**extra`` (optax
    style) is called without extras and publishes nothing.
    """
    combined = getattr(transform, "update_and_publish", None)
    if combined is not None:
        return combined(updates, state, params, **extra)
    if _accepts_extras(transform.update):
        updates, state = transform.update(updates, state, params, **extra)
    else:
        updates, state = transform.update(updates, state, params)
    return updates, state, publish(transform, state, params, **extra)


def _accepts_extras(update: Callable) -> bool:
    """Whether ``update`` takes ``**extra`` (cached per function; uncached if unhashable,
    and while ``torch.compile`` traces, which reads the signature once per compilation
    rather than through the cache)."""
    if torch.compiler.is_compiling():
        return _has_var_keyword(update)
    try:
        return _accepts_extras_cached(update)
    except TypeError:
        return _has_var_keyword(update)


@functools.lru_cache(maxsize=1024)
def _accepts_extras_cached(update: Callable) -> bool:
    return _has_var_keyword(update)


def _has_var_keyword(update: Callable) -> bool:
    """Whether ``update`` takes ``**kwargs``: from its code object's flags for a function
    (which ``torch.compile`` traces, also for a transform made inside the compiled
    region, where ``inspect.signature`` raises in dynamo), else from its signature (a
    wrapped function, a callable object); true when neither can be read."""
    code = getattr(update, "__code__", None)
    if code is not None and getattr(update, "__wrapped__", None) is None:
        return bool(code.co_flags & inspect.CO_VARKEYWORDS)
    try:
        sig = inspect.signature(update)
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def check_params(params: PyTree) -> None:
    """Raise a clear error if ``params`` is not a non-empty pytree of floating tensors."""
    tree.check_tensor_leaves(params, "params")
    leaves = tree.leaves(params)
    if not leaves:
        raise ValueError("params is an empty pytree: there is nothing to optimize")
    for leaf in leaves:
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"params must hold floating-point tensors, got dtype {leaf.dtype}; cast with "
                ".to(torch.float64) or .float()"
            )


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right, threading updates, extras and publications.

    The first member receives the incoming ``updates`` (by convention the gradient);
    when ``grad`` is not given as an extra, the incoming updates are passed as ``grad``.
    Each member's publication is computed once, right after its update; its model and
    objective entries (and undeclared ones) reach the later members as extras
    (:func:`soo_func.publication.forwarded`). A published ``params_offset`` is added to
    the final updates and not published further. The members before one that
    ``solves_model`` receive ``model_only=True`` (see :class:`Transform`).
    """
    model_only = [any(t.solves_model for t in transforms[i + 1 :]) for i in range(len(transforms))]

    def init(params: PyTree) -> ChainState:
        return ChainState(tuple(t.init(params) for t in transforms))

    def update_and_publish_all(updates, state: ChainState, params=None, **extra):
        _check_chain_state(state, len(transforms))
        if params is not None:
            check_like(updates, params, "updates (the gradient)")
        extra = dict(extra)
        if extra.get("grad") is None:
            extra["grad"] = updates
        new_states, offsets, published = [], [], {}
        for t, s, only in zip(transforms, state.states, model_only, strict=True):
            member_extra = {**extra, "model_only": True} if only else extra
            updates, s, out = update_and_publish(t, updates, s, params, **member_extra)
            new_states.append(s)
            extra.update(publication.forwarded(out))
            published.update(out)
            if out.get("params_offset") is not None:
                offsets.append(out["params_offset"])
        for offset in offsets:
            updates = tree.add(updates, offset)
        published.pop("params_offset", None)  # consumed here
        return updates, ChainState(tuple(new_states)), published

    def update(updates, state: ChainState, params=None, **extra):
        updates, state, _ = update_and_publish_all(updates, state, params, **extra)
        return updates, state

    def publish_all(state: ChainState, params=None, **extra) -> dict[str, Any]:
        extra = dict(extra)
        published: dict[str, Any] = {}
        for t, s in zip(transforms, state.states, strict=True):
            out = publish(t, s, params, **extra)
            extra.update(publication.forwarded(out))
            published.update(out)
        published.pop("params_offset", None)  # consumed by this chain's update
        return published

    solves = any(t.solves_model for t in transforms)
    return Transform(init, update, publish_all, update_and_publish_all, solves)


def _check_chain_state(state: Any, size: int) -> None:
    if state is None:
        check_state("chain", state, ChainState)
    if not isinstance(state, ChainState):
        raise TypeError(
            f"chain got a state of type {type(state).__name__}, not a ChainState: pass the "
            "state that this chain's init (or its previous update) returned"
        )
    if len(state.states) != size:
        raise ValueError(
            f"chain of {size} transforms got a state with {len(state.states)} "
            "members: was it made by this chain's init?"
        )


def stateless(fn: Callable[[PyTree, PyTree], PyTree], who: str = "stateless") -> Transform:
    """A transform from ``fn(updates, params) -> updates`` with no state (an
    :class:`EmptyState`); ``who`` names it in errors."""

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        return fn(updates, params), state

    return guarded(who, Transform(init, update), EmptyState)


def scale(step: float) -> Transform:
    """Multiply the updates by the constant ``step`` (use a negative step for gradient descent)."""
    check_finite("scale", "step", step)
    return stateless(lambda updates, params: tree.scale(step, updates), who="scale")


class SgdState(NamedTuple):
    """Momentum buffer of :func:`sgd` (``None``-free: zeros when momentum is 0)."""

    velocity: PyTree


def sgd(learning_rate: float, momentum: float = 0.0, nesterov: bool = False) -> Transform:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum.

    ``v <- momentum * v + g`` and the update is ``-learning_rate * v`` (or
    ``-learning_rate * (g + momentum * v)`` with Nesterov), as ``torch.optim.SGD``.
    """
    check_positive("sgd", "learning_rate", learning_rate)
    check_interval("sgd", "momentum", momentum, 0, 1, include_low=True)

    def init(params):
        return SgdState(tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        del params, extra
        if momentum == 0:
            return tree.scale(-learning_rate, updates), state
        velocity = tree.axpy(momentum, state.velocity, updates)
        step = tree.axpy(momentum, velocity, updates) if nesterov else velocity
        return tree.scale(-learning_rate, step), SgdState(velocity)

    return guarded("sgd", Transform(init, update), SgdState, like=lambda state: state.velocity)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leafwise, as new tensors (the inputs are not modified)."""
    check_like(updates, params)
    return tree.add(params, updates)
