"""First- and second-order oracles on pytrees, from ``torch.func``.

* :func:`value_and_grad` -- the loss and its gradient.
* :func:`hvp` -- Hessian-vector products ``H v`` (forward-over-reverse by default:
  ``jvp`` of ``grad``; reverse-over-reverse, ``vjp`` of ``grad``, selectable).
* :func:`hvp_operator` -- ``v -> H v`` at fixed params for many products (Krylov solves).
* :func:`linearize_grad` -- the gradient and an operator ``v -> H v`` that shares the
  gradient's forward pass across many products (for Krylov solves).
* :func:`ggn_vp` -- Gauss-Newton products ``J^T J v`` for a residual function.
* :func:`ggn_operator` -- generalized Gauss-Newton products ``J^T H_L J v`` for a loss
  on model outputs, sharing one linearization of the model across products.
* :func:`functional_loss` -- an ``nn.Module`` and a loss turned into a pure
  ``value_fn(params, batch)`` with ``torch.func.functional_call``.
* :class:`CountedObjective` -- wraps an objective and counts evaluations; the
  oracles above charge it (values, gradients, Hessian products) when given one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.func as tf

from soo_func import tree

PyTree = Any

__all__ = [
    "CountedObjective",
    "functional_loss",
    "ggn_operator",
    "ggn_vp",
    "hvp",
    "hvp_operator",
    "linearize_grad",
    "value_and_grad",
]


class CountedObjective:
    """An objective that counts its evaluations (the drivers wrap ``value_fn`` in one).

    Calling it counts a value; :func:`value_and_grad` counts a value and a gradient;
    :func:`hvp` and :func:`ggn_vp` count Hessian products. Evaluations made inside
    those oracles are not counted twice. The counters live on this host-side object,
    never in an optimizer's state.
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


def charge(fn: Callable, *, value: int = 0, grad: int = 0, hvp: int = 0) -> None:
    """Add evaluations made outside these oracles (e.g. Jacobian columns) to ``fn``'s
    counters when ``fn`` is a :class:`CountedObjective`; nothing otherwise."""
    if isinstance(fn, CountedObjective):
        fn.num_value_evals += value
        fn.num_grad_evals += grad
        fn.num_hvp_evals += hvp


def _unwrap(fn: Callable, *, value: int = 0, grad: int = 0, hvp: int = 0) -> Callable:
    """The raw function behind ``fn``, charging ``fn``'s counters when it counts."""
    charge(fn, value=value, grad=grad, hvp=hvp)
    return fn.fn if isinstance(fn, CountedObjective) else fn


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
            raise TypeError(
                f"value_fn returned dtype {loss.dtype}; the loss must be floating point"
            )
        return out

    return checked


def _in_functorch_transform() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def value_and_grad(
    fn: Callable[..., torch.Tensor], has_aux: bool = False
) -> Callable[..., tuple[Any, PyTree]]:
    """Return ``params, *args -> (value, grad)`` (``((value, aux), grad)`` with ``has_aux``).

    Outside ``torch.func`` transforms it runs eager reverse mode on detached aliases
    of the params (no input is touched), which is as fast as hand-written
    ``torch.autograd.grad``; inside a transform it is ``torch.func.grad_and_value``.
    """

    def wrapped(params: PyTree, *args: Any):
        raw = _scalar_loss(_unwrap(fn, value=1, grad=1), has_aux)
        tree.check_tensor_leaves(params, "params")
        if _in_functorch_transform() or not torch.is_grad_enabled():
            with torch.enable_grad():
                grad, out = tf.grad_and_value(raw, has_aux=has_aux)(params, *args)
            return out, grad
        leaves, spec = _flatten(params)
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


def _flatten(params: PyTree):
    return optree.tree_flatten(params)


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
    grad_fn = _grad_fn(_unwrap(fn, hvp=1), args)
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
    counted = fn if isinstance(fn, CountedObjective) else None
    raw = _scalar_loss(_unwrap(fn, value=1, grad=1), has_aux=False)

    def grad_with_value(p):
        g, value = tf.grad_and_value(lambda q: raw(q, *args))(p)
        return g, value

    grad, vjp_fn, value = tf.vjp(grad_with_value, params, has_aux=True)

    def hvp_fn(v: PyTree) -> PyTree:
        if counted is not None:
            counted.num_hvp_evals += 1
        return vjp_fn(v)[0]

    return value, grad, hvp_fn


def ggn_vp(residual_fn: Callable[..., PyTree], params: PyTree, v: PyTree, *args: Any) -> PyTree:
    """The Gauss-Newton product ``J^T J v`` for residuals ``r(params)`` (loss ``0.5 |r|^2``).

    ``J v`` comes from one ``jvp`` and ``J^T (J v)`` from one ``vjp``.
    """
    tree.check_same_structure(params, v, names=("params", "v"))
    raw = _unwrap(residual_fn, hvp=1)

    def residuals(p):
        return raw(p, *args)

    _, jv = tf.jvp(residuals, (params,), (v,))
    _, vjp_fn = tf.vjp(residuals, params)
    return vjp_fn(jv)[0]


def functional_loss(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[Callable[[PyTree, tuple[torch.Tensor, torch.Tensor]], torch.Tensor], dict]:
    """Turn ``module`` and ``loss_fn(outputs, targets)`` into ``(value_fn, params)``.

    ``value_fn(params, (inputs, targets))`` runs ``module`` functionally with
    ``torch.func.functional_call`` on ``params`` (a dict name -> tensor) and the
    module's buffers, so it is pure in ``params``. ``params`` is a dict of detached
    copies of the module's parameters; the module itself is not modified.
    """
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    buffers = {name: b for name, b in module.named_buffers()}
    for mod in module.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ValueError(
                f"{type(mod).__name__} in training mode updates running statistics in place, "
                "which breaks functional transforms and Hessian products: use GroupNorm or "
                "LayerNorm, or call module.eval() first"
            )

    def value_fn(p: PyTree, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        outputs = tf.functional_call(module, {**buffers, **p}, (inputs,))
        return loss_fn(outputs, targets)

    return value_fn, params


def ggn_operator(
    model_fn: Callable[..., PyTree],
    params: PyTree,
    loss_fn: Callable[[PyTree], torch.Tensor] | None = None,
    *args: Any,
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``(outputs, matvec)`` with ``matvec(v) = J^T H_L J v`` at ``params``.

    ``J`` is the Jacobian of ``outputs = model_fn(params, *args)`` and ``H_L`` the
    Hessian of ``loss_fn(outputs)`` (a 0-d loss) with respect to the outputs: the
    generalized Gauss-Newton matrix of ``loss_fn(model_fn(params))`` (Schraudolph 2002;
    Martens 2010, "Deep learning via Hessian-free optimization"). With ``loss_fn=None``
    the loss is ``0.5 ||outputs||^2`` (``H_L = I``) and ``matvec`` is ``J^T J v`` (the
    Gauss-Newton matrix of a residual function, as :func:`ggn_vp`).

    The model's forward pass and its ``vjp`` are made once here; each product costs
    one ``jvp`` of the model (``J v``), one Hessian product of the loss at the outputs
    (forward-over-reverse; nothing for ``loss_fn=None``) and one reverse pass through
    the saved graph (``J^T u``). Each product is charged as one Hessian product when
    ``model_fn`` is a :class:`CountedObjective`.
    """
    counted = model_fn if isinstance(model_fn, CountedObjective) else None
    raw = _unwrap(model_fn)

    def model(p):
        return raw(p, *args)

    outputs, vjp_fn = tf.vjp(model, params)
    loss_grad = None if loss_fn is None else tf.grad(_scalar_loss(loss_fn, has_aux=False))

    def matvec(v: PyTree) -> PyTree:
        tree.check_same_structure(params, v, names=("params", "v"))
        if counted is not None:
            counted.num_hvp_evals += 1
        _, jv = tf.jvp(model, (params,), (v,))
        hjv = jv if loss_grad is None else tf.jvp(loss_grad, (outputs,), (jv,))[1]
        return vjp_fn(hjv)[0]

    return outputs, matvec


def hvp_operator(
    fn: Callable[..., torch.Tensor],
    params: PyTree,
    *args: Any,
    mode: str = "linearize",
) -> Callable[[PyTree], PyTree]:
    """``v -> H(params) v`` for many products at the same ``params`` (a Krylov solve).

    ``mode="linearize"`` (default) runs the gradient's forward and backward pass once,
    on the first product, and answers every product with one more reverse pass through
    that saved graph (reverse-over-reverse): eager ``torch.autograd`` double backward
    outside ``torch.func`` transforms, ``torch.func.vjp`` of the gradient inside one. The shared
    gradient pass serves only the products, so it is charged to a
    :class:`CountedObjective` as one Hessian product (not as a value and gradient), and
    each product as one more. The other modes are :func:`hvp`'s
    (``"forward-over-reverse"``, ``"reverse-over-reverse"``), one full product per call.
    On small CPU problems ``torch.func``'s forward-over-reverse carries a large fixed
    overhead per call, which the shared linearization avoids (``benchmarks/bench_krylov.py``).
    """
    if mode != "linearize":
        if mode not in ("forward-over-reverse", "reverse-over-reverse"):
            raise ValueError(
                "hvp_operator mode must be 'linearize', 'forward-over-reverse' or "
                f"'reverse-over-reverse', got {mode!r}"
            )
        return lambda v: hvp(fn, params, v, *args, mode=mode)
    counted = fn if isinstance(fn, CountedObjective) else None
    raw = fn.fn if counted is not None else fn
    saved: list = []

    def product(v: PyTree) -> PyTree:
        tree.check_same_structure(params, v, names=("params", "v"))
        if not saved:
            if counted is not None:
                counted.num_hvp_evals += 1
            if _in_functorch_transform():
                saved.append(_functorch_linearization(raw, params, args))
            else:
                saved.append(_eager_linearization(raw, params, args))
        if counted is not None:
            counted.num_hvp_evals += 1
        return saved[0](v)

    return product


def _functorch_linearization(raw: Callable, params: PyTree, args: tuple) -> Callable:
    vjp_fn = tf.vjp(_grad_fn(raw, args), params)[1]
    return lambda v: vjp_fn(v)[0]


def _eager_linearization(raw: Callable, params: PyTree, args: tuple) -> Callable:
    """Eager ``torch.autograd``: one ``create_graph`` gradient, then double-backward products.

    Outside ``torch.func`` transforms this skips functorch's per-call overhead (about
    2.6x faster per product on an MLP, ``benchmarks/bench_krylov.py``). The params are
    detached aliases (nothing is modified) and the products carry no graph.
    """
    leaves, spec = _flatten(params)
    with torch.enable_grad():
        inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
        loss = _scalar_loss(raw, has_aux=False)(spec.unflatten(inputs), *args)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def product(v: PyTree) -> PyTree:
        v_leaves = _flatten(v)[0]
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
