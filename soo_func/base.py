"""The transform protocol: ``Transform``, ``chain``, ``apply_updates`` and the extras contract.

A :class:`Transform` is a pair of pure functions, as in optax::

    state = t.init(params)
    updates, state = t.update(updates, state, params, **extra)

``extra`` carries what is known at the current point (see :data:`KNOWN_EXTRAS`):
``value``, ``grad``, ``value_fn`` and ``residual_fn``. A transform that needs one
declares it with :func:`require_extras`, which raises a ``TypeError`` naming the
transform and the missing argument.

Publishing (the channel from upstream to downstream members of a chain)
-----------------------------------------------------------------------
A transform may carry a third, optional function ``publish(state, params, **extra)``
that returns a mapping of extras. :func:`chain` calls it right after the member's
``update`` (with the member's *new* state, the params and the extras the member
received) and merges the result into the extras that the members after it receive.
The chain's own ``publish`` returns everything its members published, so the
driver (:func:`soo_func.minimize`) reads it the same way. Keys with a fixed meaning:

``curvature``
    ``v -> B v``: the Hessian (or its approximation) of the direction's quadratic
    model ``m(d) = value + <grad, d> + 0.5 <d, B d>`` at ``params`` (for trust regions).
``value_fn``, ``value``, ``grad``, ``residual_fn``
    A rewritten objective and its value and gradient at ``params`` (homotopy).
``next_value``, ``next_grad``, ``next_value_fn``
    The value and gradient of ``next_value_fn`` at ``params + updates``, already
    evaluated by a search; the driver reuses them when ``next_value_fn`` is its own
    objective, so no point is evaluated twice.
``recover_objective``
    ``(value, grad, params) -> (value, grad)``, published with a rewritten ``value_fn``:
    maps that objective's value and gradient at ``params`` to the original objective's
    there, exactly (a homotopy: ``f = f_t + (1 - t) <g0, x>``). When a search's
    ``next_value_fn`` is the published ``value_fn``, the driver recovers its own value
    and gradient at the accepted point this way instead of evaluating it again.
``search_failed``
    0-d bool: the search found no acceptable step (it returned a safe one).
``converged_ok``
    0-d bool: whether the driver may declare convergence (homotopy says no before t = 1).
``initial_step``
    0-d tensor: a step-length hint for the search (nonlinear CG).
``params_offset``
    A pytree like ``params``: the member moved the point to ``params + params_offset``
    (a homotopy's predictor) and published the objective as seen from there
    (``p -> f(p + params_offset)``). :func:`chain` adds it to its final updates and does
    not publish it further (an enclosing chain does not add it twice).

Transforms written for optax's two-function protocol, with or without ``**extra``,
work as chain members unchanged: they publish nothing, and receive no extras unless
their ``update`` accepts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from soo_func import tree

PyTree = Any
State = Any

__all__ = [
    "KNOWN_EXTRAS",
    "ChainState",
    "EmptyState",
    "Transform",
    "apply_updates",
    "chain",
    "check_params",
    "publish",
    "require_extras",
    "scale",
    "sgd",
    "stateless",
]

KNOWN_EXTRAS = ("value", "grad", "value_fn", "residual_fn")


class Transform(NamedTuple):
    """A pure optimizer component: ``init(params) -> state`` and
    ``update(updates, state, params=None, **extra) -> (updates, state)``.

    ``publish(state, params, **extra) -> Mapping`` is optional; see the module docstring.
    """

    init: Callable[[PyTree], State]
    update: Callable[..., tuple[PyTree, State]]
    publish: Callable[..., Mapping[str, Any]] | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


class ChainState(NamedTuple):
    """The state of :func:`chain`: one state per member, in order."""

    states: tuple


def require_extras(who: str, extra: Mapping[str, Any], *names: str) -> None:
    """Raise ``TypeError`` naming ``who`` and each of ``names`` missing from ``extra``."""
    missing = [n for n in names if extra.get(n) is None]
    if missing:
        hints = {
            "value_fn": "value_fn=loss_fn, a function params -> 0-d loss tensor",
            "residual_fn": "residual_fn=fn, a function params -> residual pytree",
            "value": "value=loss, the 0-d loss at params",
            "grad": "grad=g, the gradient pytree at params",
        }
        wanted = "; ".join(hints.get(n, f"{n}=...") for n in missing)
        raise TypeError(
            f"{who} needs the keyword argument(s) {', '.join(missing)} in update(): pass "
            f"{wanted}. soo_func.minimize passes them for you."
        )


def publish(transform: Transform, state: State, params: PyTree, **extra: Any) -> dict[str, Any]:
    """What ``transform`` publishes at ``state`` (an empty dict for plain optax-style ones)."""
    fn = getattr(transform, "publish", None)
    if fn is None:
        return {}
    return dict(fn(state, params, **extra))


def _accepts_extras(update: Callable) -> bool:
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


def check_like(updates: PyTree, params: PyTree, what: str = "updates") -> None:
    """Structure, shape, dtype and device of ``updates`` must match ``params`` (no host sync)."""
    tree.check_same_structure(params, updates, names=("params", what))
    for p, u in zip(tree.leaves(params), tree.leaves(updates), strict=True):
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"{what} leaves must be tensors, got {type(u).__name__}")
        if p.shape != u.shape:
            raise ValueError(
                f"{what} leaf has shape {tuple(u.shape)}, params leaf {tuple(p.shape)}"
            )
        if p.device != u.device:
            raise ValueError(
                f"{what} leaf is on {u.device} but the params leaf is on {p.device}; move one "
                "with .to(device) so that both live on the same device"
            )
        if p.dtype != u.dtype:
            raise TypeError(
                f"{what} leaf has dtype {u.dtype} but the params leaf has {p.dtype}; compute the "
                "gradient at the params as they are (do not cast one of them)"
            )


def chain(*transforms: Transform) -> Transform:
    """Compose transforms left to right, threading updates, extras and publications.

    The first member receives the incoming ``updates`` (by convention the gradient);
    when ``grad`` is not given as an extra, the incoming updates are passed as ``grad``.
    """
    takes_extras = tuple(_accepts_extras(t.update) for t in transforms)

    def init(params: PyTree) -> ChainState:
        return ChainState(tuple(t.init(params) for t in transforms))

    def update(updates, state: ChainState, params=None, **extra):
        if len(state.states) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transforms got a state with {len(state.states)} "
                "members: was it made by this chain's init?"
            )
        if params is not None:
            check_like(updates, params, "updates (the gradient)")
        extra = dict(extra)
        if extra.get("grad") is None:
            extra["grad"] = updates
        new_states = []
        offsets = []
        for t, s, wants in zip(transforms, state.states, takes_extras, strict=True):
            if wants:
                updates, s = t.update(updates, s, params, **extra)
            else:
                updates, s = t.update(updates, s, params)
            new_states.append(s)
            out = publish(t, s, params, **extra)
            if out.get("params_offset") is not None:
                offsets.append(out["params_offset"])
            extra.update(out)
        for offset in offsets:
            updates = tree.add(updates, offset)
        return updates, ChainState(tuple(new_states))

    def publish_all(state: ChainState, params=None, **extra) -> dict[str, Any]:
        extra = dict(extra)
        published: dict[str, Any] = {}
        for t, s in zip(transforms, state.states, strict=True):
            out = publish(t, s, params, **extra)
            extra.update(out)
            published.update(out)
        published.pop("params_offset", None)  # consumed by this chain's update
        return published

    return Transform(init, update, publish_all)


def stateless(fn: Callable[[PyTree, PyTree], PyTree]) -> Transform:
    """A transform from ``fn(updates, params) -> updates`` with no state."""

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra):
        del extra
        return fn(updates, params), state

    return Transform(init, update)


def scale(step: float) -> Transform:
    """Multiply the updates by the constant ``step`` (use a negative step for gradient descent)."""
    return stateless(lambda updates, params: tree.scale(step, updates))


class SgdState(NamedTuple):
    """Momentum buffer of :func:`sgd` (``None``-free: zeros when momentum is 0)."""

    velocity: PyTree


def sgd(learning_rate: float, momentum: float = 0.0, nesterov: bool = False) -> Transform:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum.

    ``v <- momentum * v + g`` and the update is ``-learning_rate * v`` (or
    ``-learning_rate * (g + momentum * v)`` with Nesterov), as ``torch.optim.SGD``.
    """
    if learning_rate <= 0:
        raise ValueError(f"sgd: learning_rate must be positive, got {learning_rate}")
    if not 0 <= momentum < 1:
        raise ValueError(f"sgd: momentum must be in [0, 1), got {momentum}")

    def init(params):
        return SgdState(tree.zeros_like(params))

    def update(updates, state, params=None, **extra):
        del params, extra
        if momentum == 0:
            return tree.scale(-learning_rate, updates), state
        velocity = tree.axpy(momentum, state.velocity, updates)
        step = tree.axpy(momentum, velocity, updates) if nesterov else velocity
        return tree.scale(-learning_rate, step), SgdState(velocity)

    return Transform(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates`` leafwise, as new tensors (the inputs are not modified)."""
    check_like(updates, params)
    return tree.add(params, updates)
