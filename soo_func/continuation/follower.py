"""What both path followers share: the objective they hand the later members of a chain
(:class:`Handoff`, published by :func:`publish_handoff` without reading a tensor on the
host), evaluations of ``f_t`` charged to ``f`` (:class:`ChargedObjective`), the blank
values of their states and their :class:`~soo_func.base.Transform` (:func:`follower`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.base import Transform, require_extras
from soo_func.continuation.family import Anchor, Family
from soo_func.oracles import CountedObjective

PyTree = Any

__all__ = [
    "Blank",
    "ChargedObjective",
    "Handoff",
    "blank",
    "follower",
    "publish_handoff",
    "raw_objective",
]


class ChargedObjective(CountedObjective):
    """``fn`` as a counted objective whose evaluations are charged to ``charge_to`` (the
    driver's counted ``f``), so that evaluations of ``f_t`` count as evaluations of ``f``."""

    def __init__(self, fn: Callable, charge_to: Any):
        self.fn = fn
        self._target = charge_to if isinstance(charge_to, CountedObjective) else None
        self._own = {"num_value_evals": 0, "num_grad_evals": 0, "num_hvp_evals": 0}

    def _get(name):  # noqa: N805 - property factory
        def get(self):
            return getattr(self._target, name) if self._target is not None else self._own[name]

        def set_(self, value):
            if self._target is not None:
                setattr(self._target, name, value)
            else:
                self._own[name] = value

        return property(get, set_)

    num_value_evals = _get("num_value_evals")
    num_grad_evals = _get("num_grad_evals")
    num_hvp_evals = _get("num_hvp_evals")
    del _get


def raw_objective(fn: Callable) -> Callable:
    """The uncounted function behind ``fn`` (``fn`` itself unless it is counted)."""
    return fn.fn if isinstance(fn, CountedObjective) else fn


class Handoff(NamedTuple):
    """The objective a follower's update handed the later members of a chain, in place of
    ``f`` (a follower's state holds ``None`` when it handed ``f`` itself).

    ``value``, ``grad``: of that objective at the point the later members see, which is
    ``params + offset``. Which objective it is was decided on the host by the update and is
    recorded by which fields are ``None``, so that ``publish`` reads no tensor: ``t`` is
    the family's parameter (``None``: ``f`` itself, moved by ``offset``); ``offset`` is
    ``None`` when the point did not move; ``recover_t`` is ``t`` again when ``f`` follows
    exactly from ``f_t`` there (``recover_objective`` is published), else ``None``.
    """

    value: torch.Tensor
    grad: PyTree
    t: torch.Tensor | None = None
    offset: PyTree | None = None
    recover_t: torch.Tensor | None = None


def publish_handoff(
    family: Family, base: Callable, anchor: Anchor, handoff: Handoff
) -> dict[str, Any]:
    """The rewritten-objective entries of a publication: ``value_fn`` (``p -> f_t(p +
    offset)``, its evaluations charged to ``base``), ``value``, ``grad``, and
    ``params_offset`` / ``recover_objective`` when the handoff has them."""
    raw, offset, t = raw_objective(base), handoff.offset, handoff.t
    fn = raw if t is None else family.objective(raw, anchor)
    if t is None:
        moved = lambda p: fn(tree.add(p, offset))  # noqa: E731
    elif offset is None:
        moved = lambda p: fn(p, t)  # noqa: E731
    else:
        moved = lambda p: fn(tree.add(p, offset), t)  # noqa: E731
    out: dict[str, Any] = {
        "value_fn": ChargedObjective(moved, base),
        "value": handoff.value,
        "grad": handoff.grad,
    }
    if offset is not None:
        out["params_offset"] = offset
    if handoff.recover_t is not None:
        recover_t = handoff.recover_t
        out["recover_objective"] = lambda value_t, grad_t, x: family.recover(
            anchor, x, recover_t, value_t, grad_t
        )
    return out


class Blank(NamedTuple):
    """Blank state values on the params' device: a 0-d float of their dtype, a 0-d
    ``int64`` count, a 0-d ``False`` and a pytree of zeros like the params."""

    zero: torch.Tensor
    count: torch.Tensor
    false: torch.Tensor
    zeros: PyTree


def blank(params: PyTree) -> Blank:
    """The :class:`Blank` values of ``params``."""
    ref = tree.leaves(params)[0]
    return Blank(
        zero=torch.zeros((), dtype=ref.dtype, device=ref.device),
        count=torch.zeros((), dtype=torch.int64, device=ref.device),
        false=torch.zeros((), dtype=torch.bool, device=ref.device),
        zeros=tree.zeros_like(params),
    )


def follower(
    who: str, options: Any, init: Callable, update: Callable, publish: Callable
) -> Transform:
    """The :class:`~soo_func.base.Transform` named ``who`` of a follower from its top-level
    functions ``init(options, params)``, ``update(options, state, params, f, f_value,
    f_grad) -> (updates, state)`` (``f`` the ``value_fn`` extra, ``f_value``/``f_grad``
    the ``value``/``grad`` extras; the incoming updates are replaced) and
    ``publish(options, state, f)``."""

    def init_fn(params: PyTree):
        return init(options, params)

    def update_fn(updates, state, params=None, **extra):
        del updates
        require_extras(who, extra, "value", "grad", "value_fn")
        if params is None:
            raise TypeError(f"{who} needs params in update(updates, state, params, ...)")
        return update(options, state, params, extra["value_fn"], extra["value"], extra["grad"])

    def publish_fn(state, params=None, **extra) -> dict[str, Any]:
        return publish(options, state, extra.get("value_fn"))

    return Transform(init_fn, update_fn, publish_fn)
