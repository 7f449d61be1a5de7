"""First- and second-order oracles on pytrees, from ``torch.func``.

* :func:`value_and_grad` -- the loss and its gradient.
* :func:`hvp` -- Hessian-vector products ``H v`` (forward-over-reverse by default:
  ``jvp`` of ``grad``; reverse-over-reverse, ``vjp`` of ``grad``, selectable).
* :func:`hvp_operator` -- the one Hessian operator ``v -> (H + damping I) v`` at fixed
  params, for many products (Krylov solves, ``newton_krylov``, the batch helpers).
* :func:`linearize_grad` -- the gradient and ``v -> H v`` sharing its forward pass.
* :func:`ggn_operator` -- the one Gauss-Newton operator ``v -> (J^T H_L J + damping I) v``
  (``J^T J`` for residuals), one linearization of the model shared by its products;
  :func:`ggn_vp` is one product of it.
* :func:`functional_loss` -- an ``nn.Module`` and a loss as a pure ``value_fn(params, batch)``.
* :class:`CountedObjective` -- counts what the oracles evaluate through a function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.func as tf

from soo_func import tree
from soo_func.module_loss import functional_loss

PyTree = Any

__all__ = [
    "CountedObjective",
    "ShardedFunction",
    "charge",
    "functional_loss",
    "ggn_operator",
    "ggn_vp",
    "hvp",
    "hvp_operator",
    "linearize_grad",
    "raw_function",
    "value_and_grad",
]


class CountedObjective:
    """A function that counts the oracle calls made through it (the drivers wrap
    ``value_fn`` in one, and :func:`~soo_func.least_squares` ``residual_fn`` too).

    The counting rule, one for every oracle: what an oracle returns is charged as what
    it is, and work that only serves curvature products is charged as products.

    * ``num_value_evals`` -- evaluations: each call (a value of ``value_fn``; a residual
      vector of a ``residual_fn``, reported as ``num_residual_evals``), each
      :func:`value_and_grad` and :func:`linearize_grad` (they return the value), and
      each :func:`ggn_operator` built (it returns the model's outputs).
    * ``num_grad_evals`` -- gradients: :func:`value_and_grad`, :func:`linearize_grad`.
    * ``num_hvp_evals`` -- curvature products, 1 each: a Hessian product ``H v``
      (:func:`hvp`, :func:`hvp_operator`, the operator of :func:`linearize_grad`), a
      Gauss-Newton product ``J^T H_L J v`` (:func:`ggn_operator`, :func:`ggn_vp`); the
      shared gradient pass of ``hvp_operator(mode="linearize")``, made only for its
      products, is 1 more. Code that forms a dense Jacobian charges ``n`` (one per
      column, an ``n``-fold ``jvp``) with :func:`charge`.

    Forward passes inside these oracles are not counted again as evaluations. The
    counters live on this host-side object, never in an optimizer's state.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        if isinstance(fn, CountedObjective):
            fn = fn.fn
        self.fn = fn
        self.num_value_evals = 0
        self.num_grad_evals = 0
        self.num_hvp_evals = 0

    def __call__(self, params: PyTree, *args: Any) -> torch.Tensor:
        self.num_value_evals += 1
        return self.fn(params, *args)


class ShardedFunction:
    """Base of a function sharded over ranks (:mod:`soo_func.distributed`). The oracles
    below charge its counter as usual, then hand it their work (its ``value_and_grad``,
    ``hvp``, ``linearization``, ``linearize_grad`` and ``ggn_product`` methods), which
    reduces across the ranks."""


def charge(fn: Callable, *, value: int = 0, grad: int = 0, hvp: int = 0) -> None:
    """Add evaluations made outside these oracles (e.g. Jacobian columns) to ``fn``'s
    counters when ``fn`` is a :class:`CountedObjective`; nothing otherwise."""
    if isinstance(fn, CountedObjective):
        fn.num_value_evals += value
        fn.num_grad_evals += grad
        fn.num_hvp_evals += hvp


def raw_function(fn: Callable) -> Callable:
    """The function behind ``fn``: ``fn.fn`` for a :class:`CountedObjective`, else ``fn``
    (call it inside an oracle that has charged ``fn`` with :func:`charge`)."""
    return fn.fn if isinstance(fn, CountedObjective) else fn


def _charged(fn: Callable, *, value: int = 0, grad: int = 0, hvp: int = 0) -> Callable:
    """:func:`charge` ``fn``, then return :func:`raw_function` of it."""
    charge(fn, value=value, grad=grad, hvp=hvp)
    return raw_function(fn)


def _scalar_loss(fn: Callable, has_aux: bool) -> Callable:
    """Wrap ``fn`` to check (on metadata only) that it returns a 0-d real tensor."""

    def checked(params, *args):
        out = fn(params, *args)
        loss = out[0] if has_aux else out
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"value_fn must return a 0-d torch.Tensor{' (first of a pair, has_aux=True)' if has_aux else ''}, "
                f"got {type(loss).__name__}"
            )
        if loss.dim() != 0:
            raise ValueError(
                f"value_fn must return a scalar (0-d) loss, got shape {tuple(loss.shape)}; reduce "
                "it with .sum() or .mean() (for residuals use least_squares / residual_fn)"
            )
        if not loss.is_floating_point():
            raise TypeError(f"value_fn returned dtype {loss.dtype}; the loss must be floating")
        return out

    return checked


def value_and_grad(
    fn: Callable[..., torch.Tensor], has_aux: bool = False
) -> Callable[..., tuple[Any, PyTree]]:
    """Return ``params, *args -> (value, grad)`` (``((value, aux), grad)`` with ``has_aux``).

    Outside ``torch.func`` transforms it runs eager reverse mode on detached aliases
    of the params (no input is touched), which is as fast as hand-written
    ``torch.autograd.grad``; inside a transform it is ``torch.func.grad_and_value``.
    """

    def wrapped(params: PyTree, *args: Any):
        target = _charged(fn, value=1, grad=1)
        if isinstance(target, ShardedFunction):  # distributed hook
            return target.value_and_grad(params, *args, has_aux=has_aux)
        raw = _scalar_loss(target, has_aux)
        tree.check_tensor_leaves(params, "params")
        if tree.in_functorch_transform() or not torch.is_grad_enabled():
            with torch.enable_grad():
                grad, out = tf.grad_and_value(raw, has_aux=has_aux)(params, *args)
            return out, grad
        leaves, spec = optree.tree_flatten(params)
        inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
        out = raw(spec.unflatten(inputs), *args)
        loss = out[0] if has_aux else out
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads = [
            torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)
        ]
        out = (loss.detach(), _detach(out[1])) if has_aux else loss.detach()
        return out, spec.unflatten(grads)

    return wrapped


def _detach(x: PyTree) -> PyTree:
    return optree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def _grad_fn(fn: Callable, args: tuple) -> Callable:
    raw = _scalar_loss(fn, has_aux=False)
    return tf.grad(lambda p: raw(p, *args))


def hvp(
    fn: Callable[..., torch.Tensor],
    params: PyTree,
    v: PyTree,
    *args: Any,
    mode: str = "forward-over-reverse",
) -> PyTree:
    """The Hessian-vector product ``H(params) v`` of the scalar ``fn`` at ``params``.

    ``mode="forward-over-reverse"`` (default) is ``jvp(grad(fn), (params,), (v,))``;
    ``mode="reverse-over-reverse"`` is ``vjp(grad(fn), params)`` applied to ``v``.
    Extra positional ``args`` (a batch, say) are passed to ``fn`` unchanged.
    """
    tree.check_same_structure(params, v, names=("params", "v"))
    target = _charged(fn, hvp=1)
    if isinstance(target, ShardedFunction):  # distributed hook
        return target.hvp(params, v, *args, mode=mode)
    grad_fn = _grad_fn(target, args)
    if mode == "forward-over-reverse":
        return tf.jvp(grad_fn, (params,), (v,))[1]
    if mode == "reverse-over-reverse":
        return tf.vjp(grad_fn, params)[1](v)[0]
    raise ValueError(
        f"hvp mode must be 'forward-over-reverse' or 'reverse-over-reverse', got {mode!r}"
    )


def linearize_grad(
    fn: Callable[..., torch.Tensor], params: PyTree, *args: Any
) -> tuple[torch.Tensor, PyTree, Callable[[PyTree], PyTree]]:
    """``(value, grad, hvp_fn)`` at ``params``, where ``hvp_fn(v) = H v``.

    The gradient's forward and backward passes run once (``vjp`` of
    ``grad_and_value``); each ``hvp_fn`` call is one more reverse pass through the
    saved graph (reverse-over-reverse), so a Krylov solve with k products costs about
    one gradient plus k double-backward passes. Each product is charged as one
    Hessian product when ``fn`` is a :class:`CountedObjective`.
    """
    target = _charged(fn, value=1, grad=1)
    if isinstance(target, ShardedFunction):  # distributed hook
        value, grad, product = target.linearize_grad(params, *args)
    else:
        raw = _scalar_loss(target, has_aux=False)

        def grad_with_value(p):
            g, value = tf.grad_and_value(lambda q: raw(q, *args))(p)
            return g, value

        grad, vjp_fn, value = tf.vjp(grad_with_value, params, has_aux=True)
        product = lambda v: vjp_fn(v)[0]  # noqa: E731

    def hvp_fn(v: PyTree) -> PyTree:
        charge(fn, hvp=1)
        return product(v)

    return value, grad, hvp_fn


def ggn_vp(residual_fn: Callable[..., PyTree], params: PyTree, v: PyTree, *args: Any) -> PyTree:
    """The Gauss-Newton product ``J^T J v`` for residuals ``r(params)`` (loss ``0.5 |r|^2``).

    One product of :func:`ggn_operator` (``loss_fn=None``: one ``jvp``, one ``vjp``),
    counted as it: one evaluation (its linearization) and one product.
    """
    return ggn_operator(residual_fn, params, None, *args)[1](v)


def ggn_operator(
    model_fn: Callable[..., PyTree],
    params: PyTree,
    loss_fn: Callable[[PyTree], torch.Tensor] | None = None,
    *args: Any,
    damping: float = 0.0,
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``(outputs, matvec)`` with ``matvec(v) = J^T H_L J v + damping v`` at ``params``.

    ``J`` is the Jacobian of ``outputs = model_fn(params, *args)`` and ``H_L`` the
    Hessian of ``loss_fn(outputs)`` (a 0-d loss) with respect to the outputs: the
    generalized Gauss-Newton matrix of ``loss_fn(model_fn(params))`` (Schraudolph 2002;
    Martens 2010, "Deep learning via Hessian-free optimization"). With ``loss_fn=None``
    the loss is ``0.5 ||outputs||^2`` (``H_L = I``) and ``matvec`` is ``J^T J v``, the
    Gauss-Newton matrix of a residual function (Nocedal & Wright eq. 10.23).
    ``damping >= 0`` adds ``damping I`` (Levenberg-Marquardt / Tikhonov; Martens 2010).

    The model's forward pass is made once here and every product reuses it (a reverse
    pass for ``J v``, a loss Hessian product, a reverse pass for ``J^T u``; see
    :func:`_ggn_product`). When ``model_fn`` is a :class:`CountedObjective` it is
    charged one evaluation here (the returned outputs) and one product per ``matvec``.
    """
    target = _charged(model_fn, value=1)
    if isinstance(target, ShardedFunction):  # distributed hook
        outputs, product = target.ggn_product(params, loss_fn, *args)
    else:
        outputs, product = _ggn_product(target, params, loss_fn, args)

    def matvec(v: PyTree) -> PyTree:
        tree.check_same_structure(params, v, names=("params", "v"))
        charge(model_fn, hvp=1)
        out = product(v)
        return out if damping == 0 else tree.axpy(damping, v, out)

    return outputs, matvec


def _ggn_product(
    raw: Callable[..., PyTree], params: PyTree, loss_fn: Callable | None, args: tuple
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``(outputs, v -> J^T H_L J v)`` of the uncounted ``raw`` model (see :func:`ggn_operator`).

    The model runs forward once, under ``torch.func.vjp``: its saved graph gives ``u -> J^T
    u``. ``J^T u`` is linear in ``u``, so the ``vjp`` of ``u -> J^T u`` (at any ``u``) is
    ``v -> J v`` (the "double-backward" trick; J. Townsend 2017, "A new trick for
    calculating Jacobian vector products"), built once too. ``k`` products cost one
    forward and ``k`` pairs of reverse passes, not ``k + 1`` forwards (a ``jvp`` per
    product reruns the forward).
    """
    outputs, vjp_fn = tf.vjp(lambda p: raw(p, *args), params)

    def transpose_jacobian(u: PyTree) -> PyTree:
        return vjp_fn(u)[0]

    jacobian = tf.vjp(transpose_jacobian, tree.map_leaves(torch.zeros_like, outputs))[1]
    loss_grad = None if loss_fn is None else tf.grad(_scalar_loss(loss_fn, has_aux=False))

    def product(v: PyTree) -> PyTree:
        jv = jacobian(v)[0]
        hjv = jv if loss_grad is None else tf.jvp(loss_grad, (outputs,), (jv,))[1]
        return transpose_jacobian(hjv)

    return outputs, product


HVP_MODES = ("linearize", "forward-over-reverse", "reverse-over-reverse")


def hvp_operator(
    fn: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    mode: str = "linearize",
    damping: float = 0.0,
) -> Callable[[PyTree], PyTree]:
    """``v -> H(params) v + damping v`` for many products at the same ``params`` (a
    Krylov solve; ``damping >= 0`` is Levenberg-style regularization, N&W section 7.1).

    ``mode="linearize"`` (default) runs the gradient's forward and backward pass once,
    on the first product, and answers every product with one more reverse pass through
    that saved graph (reverse-over-reverse): eager ``torch.autograd`` double backward
    outside ``torch.func`` transforms, ``torch.func.vjp`` of the gradient inside one. The
    shared gradient pass serves only the products, so it is charged to a
    :class:`CountedObjective` as one Hessian product (not as a value and gradient), and
    each product as one more. The other modes are :func:`hvp`'s
    (``"forward-over-reverse"``, ``"reverse-over-reverse"``), one full product per call.
    Extra positional ``args`` (a batch, say) are passed to ``fn`` unchanged.
    """
    if mode not in HVP_MODES:
        raise ValueError(f"hvp_operator mode must be one of {HVP_MODES}, got {mode!r}")
    if mode == "linearize":
        product = _shared_linearization(fn, params, args)
    else:
        product = lambda v: hvp(fn, params, v, *args, mode=mode)  # noqa: E731
    if damping == 0:
        return product
    return lambda v: tree.axpy(damping, v, product(v))


def _shared_linearization(fn: Callable, params: PyTree, args: tuple) -> Callable:
    """``hvp_operator``'s ``"linearize"`` mode: the gradient graph built on the first
    product (charged as one product) and reused by every product (one each)."""
    saved: list = []

    def product(v: PyTree) -> PyTree:
        tree.check_same_structure(params, v, names=("params", "v"))
        if not saved:
            raw = _charged(fn, hvp=1)
            linearize = (
                _functorch_linearization if tree.in_functorch_transform() else _eager_linearization
            )
            if isinstance(raw, ShardedFunction):  # distributed hook
                linearize = type(raw).linearization
            saved.append(linearize(raw, params, args))
        charge(fn, hvp=1)
        return saved[0](v)

    return product


def _functorch_linearization(raw: Callable, params: PyTree, args: tuple) -> Callable:
    vjp_fn = tf.vjp(_grad_fn(raw, args), params)[1]
    return lambda v: vjp_fn(v)[0]


def _eager_linearization(raw: Callable, params: PyTree, args: tuple) -> Callable:
    """Eager ``torch.autograd``: one ``create_graph`` gradient, then double-backward products.

    Outside ``torch.func`` transforms this skips functorch's per-call overhead (see
    ``docs/design.md``, "Measured choices"). The params are detached aliases (nothing is
    modified) and the products carry no graph.
    """
    leaves, spec = optree.tree_flatten(params)
    with torch.enable_grad():
        inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
        loss = _scalar_loss(raw, has_aux=False)(spec.unflatten(inputs), *args)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def product(v: PyTree) -> PyTree:
        v_leaves = optree.tree_flatten(v)[0]
        out = [torch.zeros_like(x) for x in inputs]
        if live:
            with torch.enable_grad():
                parts = torch.autograd.grad(
                    [grads[i] for i in live],
                    inputs,
                    [v_leaves[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
            out = [o if p is None else p for o, p in zip(out, parts, strict=True)]
        return spec.unflatten(out)

    return product
