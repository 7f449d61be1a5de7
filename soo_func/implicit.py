"""Implicit differentiation of solutions: gradients of ``x*(theta)`` through ``F(x*, theta) = 0``.

A solution computed any way (a soo_func driver, another library, a closed form, a
warm-started loop) is attached to the autograd graph through its optimality condition.
By the implicit function theorem, ``F(x*(theta), theta) = 0`` gives
``dx*/dtheta = -(dF/dx)^{-1} dF/dtheta``, so for a cotangent ``v`` on ``x*`` the
reverse-mode product is

    theta_bar = -(dF/dtheta)^T w,   where   (dF/dx)^T w = v

(Krantz & Parks, *The implicit function theorem*, 2002; Blondel et al., "Efficient and
modular implicit differentiation", NeurIPS 2022, eq. (2)). The linear system is built from
``torch.func.vjp`` / ``jvp`` products and solved by a dense factorization (small ``n``) or
a Krylov method from :mod:`soo_func.krylov`:

* :func:`minimizer`: ``F = grad_x f``, so ``dF/dx`` is the Hessian ``H`` (symmetric): by
  default a Cholesky factorization of ``H`` formed from ``n`` batched products up to
  ``dense_max_params`` unknowns, else CG; MINRES for indefinite or singular Hessians,
  optional damping ``(H + damping I) w = v``;
* :func:`root`: a general ``F`` with ``F(x)`` shaped like ``x``; ``solver="normal_cg"`` (the
  default) solves ``J J^T w = J v`` (CG on the normal equations, ``J = dF/dx``), which
  needs no symmetry; ``"dense"`` LU-factorizes ``J^T``; ``"cg"`` / ``"minres"`` when ``J``
  is symmetric.

Failure is loud: the backward raises when ``x`` is not a root (``|F(x, theta)|_inf > tol``:
the solve that produced it stopped early), and warns when the linear solve does not reach
its tolerance or meets negative curvature or a failed factorization (then it retries with
MINRES, or normal-equations CG after a failed LU).

Under ``torch.func.vmap`` (a batch of problems, each with its own solution) the backward
cannot read a problem's numbers on the host: it runs the Krylov solve (never a dense one) for its full
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

SOLVERS = ("normal_cg", "cg", "minres", "dense")  # root's
MINIMIZER_SOLVERS = ("auto", "dense", "cg", "minres")
DENSE_SOLVERS = ("cholesky", "lu")  # the dense solves, by the factorization
DENSE_CHUNK = 16  # unit vectors per batched product when forming a dense dF/dx


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


def _dense_operator(matvec: Callable, like: PyTree) -> torch.Tensor:
    """The ``n x n`` matrix ``R`` with row ``i`` the raveled ``matvec(e_i)`` (``R = A^T``
    for ``matvec = A``), from ``n`` products batched by ``torch.func.vmap`` in chunks of
    ``DENSE_CHUNK`` (one product at a time when the function does not run under vmap)."""
    raveled = tree.ravel(like)
    flat = raveled.flat

    def row(e: torch.Tensor) -> torch.Tensor:
        return tree.ravel(matvec(tree.unravel(e, raveled))).flat

    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    try:
        chunks = [tf.vmap(row)(eye[i : i + DENSE_CHUNK]) for i in range(0, len(eye), DENSE_CHUNK)]
        return torch.cat(chunks)
    except RuntimeError:  # a function vmap cannot batch (a host read, an in-place op)
        return torch.stack([row(e) for e in eye])


def _dense_solve(matvec: Callable, v: PyTree, solver: str) -> PyTree | None:
    """``w`` with ``A w = v`` by a Cholesky (``"cholesky"``) or LU (``"lu"``) factorization
    of the dense ``A`` (Golub & Van Loan, *Matrix Computations*, 4th ed., Alg. 4.2.2 and
    3.4.1); None when the factorization fails (``A`` not positive definite, or singular)."""
    rows = _dense_operator(matvec, v)
    raveled = tree.ravel(v)
    if solver == "cholesky":
        factor, info = torch.linalg.cholesky_ex(0.5 * (rows + rows.mT))
        w = torch.cholesky_solve(raveled.flat[:, None], factor)[:, 0]
    else:
        w, info = torch.linalg.solve_ex(rows.mT, raveled.flat)
    if int(info) != 0:
        return None
    return tree.unravel(w, raveled)


def _warn_fallback(solver: str) -> str:
    """Warn that ``dF/dx`` is indefinite (CG, Cholesky) or singular (LU) at the solution;
    the Krylov solver to retry with."""
    what, retry = (
        ("singular (LU failed)", "normal_cg")
        if solver == "lu"
        else ("not positive definite (not a strict minimizer, or a saddle)", "minres")
    )
    warnings.warn(
        f"implicit adjoint: dF/dx is {what} at the solution: solved with {retry} instead of "
        f"{solver}; pass solver='minres' to choose it, or damping > 0 for a singular Hessian",
        RuntimeWarning,
        stacklevel=5,
    )
    return retry


def _adjoint(problem: _Problem, x: PyTree, args: tuple, v: PyTree, batched: bool) -> PyTree:
    """``w`` with ``(dF/dx)^T w = v``, warning when the solve is not to be trusted (NaN
    where it is not, under ``vmap``)."""
    solver = problem.solver
    if solver in DENSE_SOLVERS and not batched:
        matvec = _operator(problem, x, args)
        w = _dense_solve(matvec, v, solver)
        if w is not None:
            _check_residual(problem, matvec, v, w, "a dense factorization")
            return w
        solver = _warn_fallback(solver)
    elif solver in DENSE_SOLVERS:
        solver = "normal_cg" if solver == "lu" else "cg"
    return _krylov_adjoint(problem._replace(solver=solver), x, args, v, batched)


def _krylov_adjoint(problem: _Problem, x: PyTree, args: tuple, v: PyTree, batched: bool):
    """:func:`_adjoint` by a Krylov method (CG retried as MINRES on negative curvature)."""
    matvec = _operator(problem, x, args)
    rhs = v  # the normal equations J J^T w = J v:
    if problem.solver == "normal_cg":
        rhs = tf.jvp(lambda z: problem.optimality_fn(z, *args), (x,), (v,))[1]
    result = _krylov_solve(problem, matvec, rhs, problem.solver, sync_free=batched)
    if batched:
        good = _relative_residual(matvec, rhs, result.x) <= max(10 * problem.rtol, 1e-12)
        return tree.map_leaves(lambda t: torch.where(good, t, torch.nan), result.x)
    if problem.solver == "cg" and bool(result.negative_curvature):
        result = _krylov_solve(problem, matvec, rhs, _warn_fallback("cg"))
    _check_residual(problem, matvec, rhs, result.x, f"{int(result.num_iters)} iterations")
    return result.x


def _check_residual(problem: _Problem, matvec: Callable, rhs: PyTree, w: PyTree, how: str):
    """Warn when ``|rhs - A w| / |rhs| > max(10 rtol, 1e-12)``."""
    relative = float(_relative_residual(matvec, rhs, w).detach())
    if not relative <= max(10 * problem.rtol, 1e-12):
        warnings.warn(
            f"implicit adjoint: the linear solve stopped at relative residual {relative:.2e} "
            f"after {how} (rtol {problem.rtol:g}): the gradient "
            "may be wrong. dF/dx may be singular at the solution: pass damping > 0, "
            "solver='minres', or a larger max_iters",
            RuntimeWarning,
            stacklevel=5,
        )


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


def _check(rtol: float, damping: float, tol: float) -> None:
    if not 0 < rtol < 1:
        raise ValueError(f"implicit: rtol must be in (0, 1), got {rtol}")
    if not damping >= 0:
        raise ValueError(f"implicit: damping must be >= 0 and finite, got {damping}")
    if not tol > 0:
        raise ValueError(f"implicit: tol must be positive, got {tol}")


def _attach(
    optimality_fn: Callable[..., PyTree],
    solution: PyTree,
    args: tuple,
    solver: str,
    rtol: float = 1e-10,
    max_iters: int | None = None,
    damping: float = 0.0,
    tol: float = 1e-6,
) -> PyTree:
    """:func:`root` with the internal solver name (``"cholesky"``, ``"lu"`` or a Krylov one)."""
    _check(rtol, damping, tol)
    tree.check_tensor_leaves(solution, "solution")
    x_leaves, x_spec = optree.tree_flatten(solution)
    tensors, args_spec, static = _split_args(tuple(args))
    problem = _Problem(
        optimality_fn, x_spec, args_spec, static, solver, rtol, max_iters, damping, tol
    )
    out = _RootAdjoint.apply(problem, len(x_leaves), *x_leaves, *tensors)
    return optree.tree_unflatten(x_spec, list(out))


def root(
    optimality_fn: Callable[..., PyTree],
    solution: PyTree,
    args: tuple = (),
    *,
    solver: str = "normal_cg",
    **options: Any,
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
        ``"minres"`` (symmetric), ``"dense"`` (``J`` formed from ``n`` batched products
        and LU-factorized; one leaf dtype, small ``n``).
      options: ``rtol`` (the solve's relative tolerance, default ``1e-10``; the dense solve
        is checked against it too), ``max_iters`` (the Krylov iteration cap, default
        ``2 n``), ``damping`` (solve with ``dF/dx + damping I``, for a singular ``dF/dx``;
        biases the gradient), ``tol`` (the backward raises when
        ``|F(solution, *args)|_inf > tol``; default ``1e-6``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"implicit: solver must be one of {SOLVERS}, got {solver!r}")
    return _attach(optimality_fn, solution, args, "lu" if solver == "dense" else solver, **options)


def _dense_fits(solution: PyTree, dense_max_params: int) -> bool:
    """Whether ``solver="auto"`` forms the Hessian: at most ``dense_max_params`` entries,
    one floating dtype across the leaves."""
    leaves = tree.leaves(solution)
    dtypes = {leaf.dtype for leaf in leaves}
    size = sum(leaf.numel() for leaf in leaves)
    return len(dtypes) == 1 and leaves[0].is_floating_point() and size <= dense_max_params


def minimizer(
    value_fn: Callable[..., torch.Tensor],
    solution: PyTree,
    args: tuple = (),
    *,
    solver: str = "auto",
    dense_max_params: int = 200,
    **options: Any,
) -> PyTree:
    """``solution`` (a minimizer of ``value_fn(x, *args)`` over ``x``), differentiable with
    respect to ``args`` through ``grad_x value_fn(x*, *args) = 0``.

    The adjoint system is ``H w = v`` with the Hessian ``H`` at ``x*``, from products by
    ``vjp`` of the gradient. ``solver``:

    * ``"dense"``: ``H`` formed from ``n`` products batched by ``torch.func.vmap`` (its
      columns ``H e_i``), then a Cholesky factorization: exact, and ``n`` batched products
      instead of CG's sequential ones, which number up to ``sqrt(cond H)`` or more (Nocedal
      & Wright, eq. 5.36; rounding can push them past ``n``);
    * ``"cg"`` (matrix-free, for large ``n``) and ``"minres"`` (indefinite ``H``);
    * ``"auto"`` (default): ``"dense"`` up to ``dense_max_params`` entries of one
      floating dtype, else ``"cg"``; under ``torch.func.vmap`` always ``"cg"``.

    A ``H`` that is not positive definite (a failed Cholesky factorization, or negative
    curvature met by CG) is solved again by MINRES, with a warning. ``options`` are
    :func:`root`'s (``rtol``, ``max_iters``, ``damping``, ``tol``).
    """
    if solver not in MINIMIZER_SOLVERS:
        raise ValueError(
            f"implicit.minimizer: solver must be one of {MINIMIZER_SOLVERS}, got {solver!r}"
        )
    if solver == "auto":
        solver = "dense" if _dense_fits(solution, dense_max_params) else "cg"
    gradient = tf.grad(value_fn)
    return _attach(gradient, solution, args, "cholesky" if solver == "dense" else solver, **options)
