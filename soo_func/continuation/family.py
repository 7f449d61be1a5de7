"""The homotopy family ``f_t``, its formulas written once: :func:`make_family`.

A family replaces the objective ``f`` by ``f_t``, ``t`` in ``[0, 1]``, ``f_1 = f``, built
at an :class:`Anchor` (the start ``x0``, ``g0 = grad f(x0)`` and the anchor curvature ``s``,
the Hessian ``s I`` of the convex family's ``f_0``):

``"keller"`` (Keller 1978, "Global homotopies and Newton methods")
    ``f_t(x) = f(x) - (1 - t) <g0, x>``, so ``grad f_t = grad f - (1 - t) g0`` and the
    gradient equation ``H(x, t) = grad f(x) - (1 - t) g0 = 0`` holds at ``(x0, 0)``.
    Recovery: ``f = f_t + (1 - t) <g0, x>``, ``grad f = grad f_t + (1 - t) g0``.
    Jacobian of ``H``: ``H_x = hess f``, ``H_t = g0``. Its minimizer path starts at
    ``x0``; with ``schedule="exponential"`` the factor ``1 - t`` is ``exp(-s)``: the
    stages are steps in ``s`` and the path is that of the continuous Newton flow
    ``dx/ds = -H^{-1} grad f`` (Smale 1976; Branin 1972). Its points are stationary points
    of ``f_t``, saddles where the Hessian at ``x0`` is indefinite, which a descent
    corrector cannot track, and along a curved valley it advances only as ``1 - t``
    reaches ``|grad f| / |grad f(x0)|``.
``"convex"`` (the fixed-point homotopy, Allgower & Georg 2003 section 1.1; Chow,
Mallet-Paret & Yorke 1978)
    ``f_t(x) = t f(x) + (1 - t) (s / 2) |x - x0|^2``, so
    ``grad f_t = t grad f + (1 - t) s (x - x0)``. Recovery (``t > 0``):
    ``f = (f_t - (1 - t) (s / 2) |x - x0|^2) / t``,
    ``grad f = (grad f_t - (1 - t) s (x - x0)) / t``; it divides by ``t`` and so amplifies
    rounding by ``1 / t``: it is offered only for ``t >= 0.1``. Jacobian:
    ``H_x = t hess f + (1 - t) s I``, ``H_t = grad f - s (x - x0)``. ``x0`` minimizes the
    strongly convex ``f_0`` and ``x(t)`` is a path of *minimizers* (a proximal path:
    ``x(t)`` minimizes ``f + lam/2 |x - x0|^2``, ``lam = (1 - t) s / t``), so a descent
    corrector can follow it; at a fold it falls to another minimizer of ``f_t``.
a callable ``family(params, t) -> 0-d loss``
    A user family with ``family(params, 1) == f(params)``: only its value is known (no
    composition from ``f``, no recovery, no Jacobian pieces). ``x0`` need not be on its
    path: the minimizer path's stage 0 solves ``t = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree

PyTree = Any
UserFamily = Callable[[PyTree, torch.Tensor], torch.Tensor]

__all__ = ["Anchor", "Family", "UserFamily", "default_curvature", "make_family"]


class Anchor(NamedTuple):
    """Where a homotopy starts: ``point = x0``, ``grad = grad f(x0)``, ``curvature = s`` (the
    convex family's ``f_0 = (s / 2) |x - x0|^2`` has Hessian ``s I``)."""

    point: PyTree
    grad: PyTree
    curvature: torch.Tensor


class Family(NamedTuple):
    """One homotopy family as functions of an :class:`Anchor` (see the module docstring).

    ``objective(f, anchor) -> (p, t) -> f_t(p)`` is defined for every family; the others
    are ``None`` for a user family:

    * ``value(anchor, x, t, f_x) -> f_t(x)`` and ``grad(anchor, x, t, grad_f_x) ->
      grad f_t(x)`` (which is ``H(x, t)``): ``f_t`` composed from ``f`` at the same point;
    * ``recover(anchor, x, t, value_t, grad_t) -> (f(x), grad f(x))``, exact, valid for
      ``t >= min_recover_t``;
    * ``hessian_product(anchor, t, hess_f) -> (v -> H_x v)`` from ``hess_f: v -> hess f v``
      and ``t_derivative(anchor, x, grad_f_x) -> H_t``: the Jacobian ``[H_x  H_t]`` of the
      path's equation ``H(x, t) = grad f_t(x) = 0``.
    """

    name: str
    objective: Callable[[Callable, Anchor], UserFamily]
    value: Callable[..., torch.Tensor] | None = None
    grad: Callable[..., PyTree] | None = None
    recover: Callable[..., tuple[torch.Tensor, PyTree]] | None = None
    min_recover_t: float = 0.0
    hessian_product: Callable[..., Callable[[PyTree], PyTree]] | None = None
    t_derivative: Callable[..., PyTree] | None = None

    @property
    def builtin(self) -> bool:
        """Whether ``f_t`` is composed from ``f`` (``"keller"``, ``"convex"``)."""
        return self.value is not None

    def compose(self, anchor: Anchor, x: PyTree, t, f_value, f_grad):
        """``(f_t(x), grad f_t(x))`` from ``(f(x), grad f(x))`` (built-in families)."""
        return self.value(anchor, x, t, f_value), self.grad(anchor, x, t, f_grad)


def _keller_value(anchor: Anchor, x: PyTree, t, f_value):
    return f_value - (1 - t) * tree.vdot(anchor.grad, x)


def _keller_grad(anchor: Anchor, x: PyTree, t, f_grad):
    return tree.axpy(-(1 - t), anchor.grad, f_grad)


def _keller_recover(anchor: Anchor, x: PyTree, t, value_t, grad_t):
    c = 1 - t
    return value_t + c * tree.vdot(anchor.grad, x), tree.axpy(c, anchor.grad, grad_t)


def _keller_hessian_product(anchor: Anchor, t, hess_f: Callable) -> Callable:
    return hess_f


def _keller_t_derivative(anchor: Anchor, x: PyTree, f_grad):
    return anchor.grad


def _convex_value(anchor: Anchor, x: PyTree, t, f_value):
    diff = tree.sub(x, anchor.point)
    return t * f_value + (1 - t) * 0.5 * anchor.curvature * tree.sum_of_squares(diff)


def _convex_grad(anchor: Anchor, x: PyTree, t, f_grad):
    diff = tree.sub(x, anchor.point)
    return tree.add(tree.scale(t, f_grad), tree.scale((1 - t) * anchor.curvature, diff))


def _convex_recover(anchor: Anchor, x: PyTree, t, value_t, grad_t):
    c = 1 - t
    diff = tree.sub(x, anchor.point)
    value = (value_t - c * 0.5 * anchor.curvature * tree.sum_of_squares(diff)) / t
    return value, tree.scale(1 / t, tree.axpy(-c * anchor.curvature, diff, grad_t))


def _convex_hessian_product(anchor: Anchor, t, hess_f: Callable) -> Callable:
    return lambda v: tree.add(tree.scale(t, hess_f(v)), tree.scale((1 - t) * anchor.curvature, v))


def _convex_t_derivative(anchor: Anchor, x: PyTree, f_grad):
    return tree.axpy(-anchor.curvature, tree.sub(x, anchor.point), f_grad)


def _composed_objective(value: Callable) -> Callable[[Callable, Anchor], UserFamily]:
    """``(f, anchor) -> (p, t) -> value(anchor, p, t, f(p))``: ``f_t`` from its formula."""
    return lambda f, anchor: lambda p, t: value(anchor, p, t, f(p))


def make_family(family: str | UserFamily) -> Family:
    """The :class:`Family` of ``"keller"``, ``"convex"`` or a callable ``family(params, t)``."""
    if callable(family):
        return Family("user", objective=lambda f, anchor: family)
    if family == "keller":
        pieces = (_keller_value, _keller_grad, _keller_recover, -math.inf)
        jacobian = (_keller_hessian_product, _keller_t_derivative)
    elif family == "convex":
        pieces = (_convex_value, _convex_grad, _convex_recover, 0.1)
        jacobian = (_convex_hessian_product, _convex_t_derivative)
    else:
        raise ValueError(
            f"homotopy: family must be 'keller', 'convex' or a callable family(params, t), "
            f"got {family!r}"
        )
    value, grad, recover, min_t = pieces
    return Family(
        family,
        objective=_composed_objective(value),
        value=value,
        grad=grad,
        recover=recover,
        min_recover_t=min_t,
        hessian_product=jacobian[0],
        t_derivative=jacobian[1],
    )


def default_curvature(params: PyTree, f_grad: PyTree) -> torch.Tensor:
    """The default anchor curvature ``s = |grad f(x0)| / max(|x0|, 1)`` (gradient over
    distance: the size of ``f``'s curvature seen from the origin)."""
    return tree.norm(f_grad) / torch.clamp(tree.norm(params), min=1.0)
