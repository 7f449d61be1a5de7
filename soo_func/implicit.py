"""Implicit differentiation of solutions: gradients of ``x*(theta)`` through ``F(x*, theta) = 0``.

A solution computed any way (a soo_func driver, another library, a closed form, a
warm-started loop) is attached to the autograd graph through its optimality condition.
By the implicit function theorem, ``F(x*(theta), theta) = 0`` gives
``dx*/dtheta = -(dF/dx)^{-1} dF/dtheta``, so for a cotangent ``v`` on ``x*`` the
reverse-mode product is

    theta_bar = -(dF/dtheta)^T w,   where   (dF/dx)^T w = v

(Krantz & Parks, *The implicit function theorem*, 2002; Blondel et al., "Efficient and
modular implicit differentiation", NeurIPS 2022, eq. (2)). The linear system is solved
matrix-free with ``torch.func.vjp`` / ``jvp`` products and a Krylov method from
:mod:`soo_func.krylov`:

* :func:`minimizer`: ``F = grad_x f``, so ``dF/dx`` is the Hessian ``H`` (symmetric): CG by
  default (``H`` positive definite at a strict minimizer), MINRES for indefinite or
  singular Hessians, optional damping ``(H + damping I) w = v``;
* :func:`root`: a general ``F`` with ``F(x)`` shaped like ``x``; ``solver="normal_cg"`` (the
  default) solves ``J J^T w = J v`` (CG on the normal equations, ``J = dF/dx``), which
  needs no symmetry; ``"cg"`` / ``"minres"`` when ``J`` is symmetric.

Failure is loud: the backward raises when ``x`` is not a root (``|F(x, theta)|_inf > tol``:
the solve that produced it stopped early), and warns when the linear solve does not reach
its tolerance or meets negative curvature (then it retries with MINRES).

Under ``torch.func.vmap`` (a batch of problems, each with its own solution) the backward
cannot read a problem's numbers on the host: it runs the Krylov solve for its full
``max_iters`` with per-problem masks (``check_every=None``), and a problem whose point is
not a root, or whose linear solve did not reach ``10 rtol``, gets NaN gradients instead of
an exception or a warning. Only the tensors of ``args`` that require grad are
differentiated (``vjp`` with respect to them alone).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
import torch.func as tf

from soo_func import krylov, tree

PyTree = Any

__all__ = ["minimizer", "root"]

SOLVERS = ("cg", "minres", "normal_cg")


class _Problem(NamedTuple):
    """What the backward needs besides the tensors: how to rebuild ``x`` and ``args``."""

    optimality_fn: Callable[..., PyTree]
    x_spec: Any
    args_spec: Any
    args_static: tuple  # the non-tensor leaves of args, by position (None where a tensor is)
    solver: str
    rtol: float
    max_iters: int | None
    damping: float
    tol: float


def _split_args(args: tuple) -> tuple[list[torch.Tensor], Any, tuple]:
    leaves, spec = optree.tree_flatten(args)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    static = tuple(None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves)
    return tensors, spec, static


def _join_args(problem: _Problem, tensors: list[torch.Tensor]) -> tuple:
    feed = iter(tensors)
    leaves = [next(feed) if s is None else s for s in problem.args_static]
    return optree.tree_unflatten(problem.args_spec, leaves)


def _operator(problem: _Problem, x: PyTree, args: tuple) -> Callable[[PyTree], PyTree]:
    """``w -> (dF/dx)^T w`` (symmetric solvers) or ``w -> J J^T w`` (normal equations),
    plus ``damping w``."""

    def fn(z):
        return problem.optimality_fn(z, *args)

    _, vjp_fn = tf.vjp(fn, x)

    def transposed(w: PyTree) -> PyTree:
        return vjp_fn(w)[0]

    if problem.solver == "normal_cg":

        def product(w: PyTree) -> PyTree:
            return tf.jvp(fn, (x,), (transposed(w),))[1]

    else:
        product = transposed
    if problem.damping == 0:
        return product
    return lambda w: tree.axpy(problem.damping, w, product(w))


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active (its batched tensors have no host value)."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def _krylov_solve(problem: _Problem, matvec: Callable, rhs: PyTree, solver: str, sync_free=False):
    method = krylov.minres if solver == "minres" else krylov.cg
    check_every = None if sync_free else 1
    return method(
        matvec, rhs, rtol=problem.rtol, max_iters=problem.max_iters, check_every=check_every
    )


def _relative_residual(matvec: Callable, rhs: PyTree, solution: PyTree) -> torch.Tensor:
    """``|rhs - A solution| / |rhs|`` from one more product (trusts no recurrence)."""
    scale = tree.norm(rhs).clamp_min(torch.finfo(tree.leaves(rhs)[0].dtype).tiny)
    return tree.norm(tree.sub(rhs, matvec(solution))) / scale


def _adjoint(problem: _Problem, x: PyTree, args: tuple, v: PyTree, batched: bool) -> PyTree:
    """``w`` with ``(dF/dx)^T w = v``, warning when the solve is not to be trusted (NaN
    where it is not, under ``vmap``)."""
    matvec = _operator(problem, x, args)
    if problem.solver == "normal_cg":

        def fn(z):
            return problem.optimality_fn(z, *args)

        rhs = tf.jvp(fn, (x,), (v,))[1]
    else:
        rhs = v
    result = _krylov_solve(problem, matvec, rhs, problem.solver, sync_free=batched)
    if batched:
        good = _relative_residual(matvec, rhs, result.x) <= max(10 * problem.rtol, 1e-12)
        return tree.map_leaves(lambda t: torch.where(good, t, torch.nan), result.x)
    if problem.solver == "cg" and bool(result.negative_curvature):
        warnings.warn(
            "implicit adjoint: dF/dx is not positive definite at the solution (not a strict "
            "minimizer, or a saddle): solved with MINRES instead of CG; pass solver='minres' "
            "to choose it, or damping > 0 for a singular Hessian",
            RuntimeWarning,
            stacklevel=4,
        )
        result = _krylov_solve(problem, matvec, rhs, "minres")
    relative = float(_relative_residual(matvec, rhs, result.x).detach())
    if not relative <= max(10 * problem.rtol, 1e-12):
        warnings.warn(
            f"implicit adjoint: the linear solve stopped at relative residual {relative:.2e} "
            f"after {int(result.num_iters)} iterations (rtol {problem.rtol:g}): the gradient "
            "may be wrong. dF/dx may be singular at the solution: pass damping > 0, "
            "solver='minres', or a larger max_iters",
            RuntimeWarning,
            stacklevel=4,
        )
    return result.x


class _RootAdjoint(torch.autograd.Function):
    """Identity on the solution's leaves forward; the implicit adjoint backward."""

    generate_vmap_rule = True  # torch.func.vmap runs forward and backward batched

    @staticmethod
    def forward(problem: _Problem, num_x: int, *leaves: torch.Tensor):
        return tuple(leaf.detach().clone() for leaf in leaves[:num_x])

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, num_x, *leaves = inputs
        ctx.problem, ctx.num_x = problem, num_x
        ctx.save_for_backward(*leaves)

    @staticmethod
    def backward(ctx, *cotangents):
        problem, num_x = ctx.problem, ctx.num_x
        leaves = [t.detach() for t in ctx.saved_tensors]
        x = optree.tree_unflatten(problem.x_spec, leaves[:num_x])
        theta = leaves[num_x:]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2 + num_x :]) if need]
        grads: list[torch.Tensor | None] = [None] * len(theta)
        if not wanted:
            return (None, None, *([None] * num_x), *grads)
        args = _join_args(problem, theta)
        batched = under_vmap()
        at_root = _at_root(problem, x, args, batched)
        v = optree.tree_unflatten(
            problem.x_spec,
            [
                torch.zeros_like(t) if c is None else c
                for c, t in zip(cotangents, leaves, strict=False)
            ],
        )
        w = _adjoint(problem, x, args, v, batched)

        def of_theta(*wanted_leaves):
            full = list(theta)
            for i, leaf in zip(wanted, wanted_leaves, strict=True):
                full[i] = leaf
            return problem.optimality_fn(x, *_join_args(problem, full))

        _, vjp_theta = tf.vjp(of_theta, *[theta[i] for i in wanted])
        for i, g in zip(wanted, vjp_theta(w), strict=True):
            grads[i] = torch.where(at_root, -g, torch.nan)
        return (None, None, *([None] * num_x), *grads)


def _at_root(problem: _Problem, x: PyTree, args: tuple, batched: bool) -> torch.Tensor:
    """0-d bool: ``|F(x, args)|_inf <= tol``. Raises when not, outside ``vmap``."""
    with torch.no_grad():
        distance = tree.norm(problem.optimality_fn(x, *args), float("inf"))
    if batched:
        return distance <= problem.tol
    if not float(distance) <= problem.tol:
        raise ValueError(
            f"implicit gradient at a point that is not a root of the optimality condition: "
            f"|F(x, args)|_inf = {float(distance):.3e} > tol = {problem.tol:g}. The solve that "
            "produced x stopped early (max_steps, a failed search): solve to a tighter "
            "tolerance, raise tol if F is badly scaled, or differentiate the steps "
            "(adjoint='unrolled')"
        )
    return torch.ones((), dtype=torch.bool, device=distance.device)


def _check(solver: str, rtol: float, damping: float, tol: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"implicit: solver must be one of {SOLVERS}, got {solver!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"implicit: rtol must be in (0, 1), got {rtol}")
    if not damping >= 0:
        raise ValueError(f"implicit: damping must be >= 0 and finite, got {damping}")
    if not tol > 0:
        raise ValueError(f"implicit: tol must be positive, got {tol}")


def root(
    optimality_fn: Callable[..., PyTree],
    solution: PyTree,
    args: tuple = (),
    *,
    solver: str = "normal_cg",
    rtol: float = 1e-10,
    max_iters: int | None = None,
    damping: float = 0.0,
    tol: float = 1e-6,
) -> PyTree:
    """``solution``, differentiable with respect to the tensors of ``args`` through
    ``optimality_fn(solution, *args) = 0``.

    Args:
      optimality_fn: ``F(x, *args)``, returning a pytree shaped like ``x``, zero at the
        solution (a gradient for a minimizer: see :func:`minimizer`).
      solution: the root ``x*`` (a pytree of tensors), computed any way; it is treated as a
        constant of the graph (no gradient flows into how it was computed).
      args: a tuple of pytrees; their tensor leaves receive ``-(dF/dtheta)^T w``.
      solver: ``"normal_cg"`` (any ``J = dF/dx``), ``"cg"`` (symmetric positive definite),
        ``"minres"`` (symmetric).
      rtol: the Krylov solve's relative tolerance.
      max_iters: the Krylov solve's iteration cap (default ``2 n``).
      damping: solve with ``dF/dx + damping I`` (for singular ``dF/dx``; biases the gradient).
      tol: the backward raises when ``|F(solution, *args)|_inf > tol``.
    """
    _check(solver, rtol, damping, tol)
    tree.check_tensor_leaves(solution, "solution")
    x_leaves, x_spec = optree.tree_flatten(solution)
    tensors, args_spec, static = _split_args(tuple(args))
    problem = _Problem(
        optimality_fn, x_spec, args_spec, static, solver, rtol, max_iters, damping, tol
    )
    out = _RootAdjoint.apply(problem, len(x_leaves), *x_leaves, *tensors)
    return optree.tree_unflatten(x_spec, list(out))


def minimizer(
    value_fn: Callable[..., torch.Tensor],
    solution: PyTree,
    args: tuple = (),
    *,
    solver: str = "cg",
    **options: Any,
) -> PyTree:
    """``solution`` (a minimizer of ``value_fn(x, *args)`` over ``x``), differentiable with
    respect to ``args`` through ``grad_x value_fn(x*, *args) = 0``.

    The adjoint system is ``H w = v`` with the Hessian ``H`` at ``x*`` (products by
    ``vjp`` of the gradient): CG by default, MINRES with ``solver="minres"`` (or
    automatically, with a warning, when CG meets negative curvature). ``options`` are
    :func:`root`'s (``rtol``, ``max_iters``, ``damping``, ``tol``).
    """
    if solver not in ("cg", "minres"):
        raise ValueError(f"implicit.minimizer: solver must be 'cg' or 'minres', got {solver!r}")
    gradient = tf.grad(value_fn)
    return root(gradient, solution, args, solver=solver, **options)
