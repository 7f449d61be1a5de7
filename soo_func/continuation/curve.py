"""The curve of :func:`~soo_func.continuation.arclength_homotopy`: the homotopy map
``H(x, t) = grad f_t(x)`` of a built-in :class:`~soo_func.continuation.family.Family`,
its Jacobian products in ``z = (x, w)``, ``w = c t``, the minimum-norm solves of the
predictor and corrector (dense or MINRES), and the Hessian test at ``t = 1`` crossings
(Lanczos)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.continuation.family import Anchor, Family
from soo_func.krylov import minres
from soo_func.oracles import hvp, value_and_grad

PyTree = Any

__all__ = ["Curve", "dense_matrix", "ritz_extremes"]


class Curve(NamedTuple):
    """``H``, its Jacobian products and the minimum-norm solves at one anchor.

    ``c`` is the unit of ``t`` (``w = c t``), ``tol`` the corrector's relative tolerance
    and ``max_corrector_iters`` its iterations, ``dense``: solve with dense matrices (from
    ``n`` Hessian products) instead of MINRES.
    """

    family: Family
    base: Callable
    anchor: Anchor
    c: torch.Tensor
    krylov_rtol: float
    krylov_iters: int | None
    tol: float
    max_corrector_iters: int
    dense: bool

    def residual(self, x: PyTree, t) -> tuple[torch.Tensor, PyTree, PyTree]:
        """``(f(x), grad f(x), H(x, t))``."""
        value, grad = value_and_grad(self.base)(x)
        return value, grad, self.family.grad(self.anchor, x, t, grad)

    def jacobian(self, x: PyTree, t, grad: PyTree) -> tuple[Callable, PyTree]:
        """``(v -> H_x v, H_w)`` at ``(x, t)``, ``H_w = H_t / c`` (``H_x`` is symmetric)."""
        hess_f = lambda v: hvp(self.base, x, v)  # noqa: E731
        h_x = self.family.hessian_product(self.anchor, t, hess_f)
        h_w = tree.scale(1 / self.c, self.family.t_derivative(self.anchor, x, grad))
        return h_x, h_w

    def min_norm(self, x, t, grad, a_x, a_w, b, normal=None):
        """``u = a - K^T (K K^T)^{-1} (K a - b)``, ``K = J`` or, with a unit ``normal``
        ``n``, ``K = J (I - n n^T)`` (then ``u`` is orthogonal to ``n``: the
        pseudo-arclength corrector's hyperplane, Allgower & Georg section 3.3). Dense
        (from ``n`` Hessian products) or MINRES on the saddle-point system
        ``[[s I, K^T], [K, 0]]`` (``s`` the anchor's curvature)."""
        h_x, h_w = self.jacobian(x, t, grad)
        if self.dense:
            return _dense_min_norm(x, h_x, h_w, a_x, a_w, b, normal)
        s = self.anchor.curvature

        def project(u_x, u_w):
            if normal is None:
                return u_x, u_w
            dot = tree.vdot(normal[0], u_x) + normal[1] * u_w
            return tree.axpy(-dot, normal[0], u_x), u_w - dot * normal[1]

        def matvec(v):
            u_x, u_w, y = v
            hy_x, hy_w = project(h_x(y), tree.vdot(h_w, y))
            p_x, p_w = project(u_x, u_w)
            top = tree.axpy(s, u_x, hy_x)
            return top, s * u_w + hy_w, tree.add(h_x(p_x), tree.scale(p_w, h_w))

        rhs = (tree.scale(s, a_x), s * a_w, b)
        n = sum(leaf.numel() for leaf in tree.leaves(x))
        iters = self.krylov_iters if self.krylov_iters is not None else max(4 * (2 * n + 1), 30)
        u_x, u_w, _ = minres(matvec, rhs, max_iters=iters, rtol=self.krylov_rtol).x
        return u_x, u_w

    def solve_x(self, x, t, grad, rhs):
        """``H_x^+ rhs`` at fixed ``t`` (dense pseudo-inverse or MINRES)."""
        h_x, _ = self.jacobian(x, t, grad)
        if not self.dense:
            return minres(h_x, rhs, rtol=self.krylov_rtol).x
        hess, raveled = dense_matrix(h_x, x)
        flat = tree.ravel(rhs).flat
        if not bool(torch.isfinite(hess).all() & torch.isfinite(flat).all()):
            return tree.map_leaves(lambda r: torch.full_like(r, math.nan), rhs)
        return tree.unravel(torch.linalg.pinv(hess) @ flat, raveled)

    def tangent(self, x, t, grad, prev_x, prev_w):
        """The unit null vector of ``J`` nearest ``prev`` (its orientation)."""
        zero = tree.zeros_like(x)
        u_x, u_w = self.min_norm(x, t, grad, prev_x, prev_w, zero)
        size = torch.sqrt(tree.sum_of_squares(u_x) + u_w**2)
        return tree.scale(1 / size, u_x), u_w / size

    def predict_correct(self, x, w, tau_x, tau_w, h: float):
        """The Euler predictor ``z + h tau`` and the pseudo-arclength Newton corrector
        (Allgower & Georg Algorithm 3.1.1): ``((x, w, f, grad f) or None, iterations)``,
        ``None`` when rejected (non-finite, a first step above ``h / 2`` or one that does
        not contract by half)."""
        c = float(self.c)
        x, w = tree.axpy(h, tau_x, x), w + h * tau_w
        previous = None
        for k in range(self.max_corrector_iters):
            value, grad, h_val = self.residual(x, w / c)
            u_x, u_w = self.min_norm(x, w / c, grad, tree.zeros_like(x), torch.zeros_like(w),
                                     tree.neg(h_val), normal=(tau_x, tau_w))  # fmt: skip
            size, z_size = torch.stack([
                torch.sqrt(tree.sum_of_squares(u_x) + u_w**2),
                torch.sqrt(tree.sum_of_squares(x) + w**2) + value * 0,  # NaN if f is not finite
            ]).tolist()  # fmt: skip
            if not (math.isfinite(size) and math.isfinite(z_size)):
                return None, k + 1
            x, w = tree.add(x, u_x), w + u_w
            if (k == 0 and size > 0.5 * h) or (previous is not None and size > 0.5 * previous):
                return None, k + 1
            previous = size
            if size <= self.tol * (1 + z_size):
                value, grad, _ = self.residual(x, w / c)
                return (x, w, value, grad), k + 1
        return None, self.max_corrector_iters

    def refine_crossing(self, x_old, w_old, x_new, w_new):
        """Newton on ``grad f = 0`` from the interpolated crossing of ``t = 1``, then the
        Lanczos test of the Hessian there: ``(x, f(x), minimizer)``."""
        c = float(self.c)
        a = (c - w_old) / (w_new - w_old)
        x = tree.add(x_old, tree.scale(a, tree.sub(x_new, x_old)))
        one = torch.ones_like(w_old)
        for _ in range(5):
            _, grad, h_val = self.residual(x, one)
            dx = self.solve_x(x, one, grad, tree.neg(h_val))
            x = tree.add(x, dx)
            if float(tree.norm(dx)) <= self.tol * (1 + float(tree.norm(x))):
                break
        value = value_and_grad(self.base)(x)[0]
        n = sum(leaf.numel() for leaf in tree.leaves(x))
        gen = torch.Generator().manual_seed(0)
        probe = tree.map_leaves(lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64)
                         .to(p), x)  # fmt: skip
        low, high = ritz_extremes(lambda v: hvp(self.base, x, v), probe, min(n, 100))
        eps = torch.finfo(value.dtype).eps
        return x, value, low >= -math.sqrt(eps) * max(abs(high), 1e-300)


def _dense_min_norm(x, h_x, h_w, a_x, a_w, b, normal):
    """:meth:`Curve.min_norm` with the Jacobian as a dense matrix (pseudo-inverse)."""
    hess, raveled = dense_matrix(h_x, x)
    jac = torch.cat([hess, tree.ravel(h_w).flat[:, None]], 1)
    a = torch.cat([tree.ravel(a_x).flat, a_w.reshape(1)])
    rhs = tree.ravel(b).flat - jac @ a
    if normal is not None:  # [J; n^T] d = [b - J a; -n^T a]
        n_vec = torch.cat([tree.ravel(normal[0]).flat, normal[1].reshape(1)])
        jac, rhs = torch.cat([jac, n_vec[None]]), torch.cat([rhs, -(n_vec @ a).reshape(1)])
    if not bool(torch.isfinite(jac).all() & torch.isfinite(rhs).all()):
        u = torch.full_like(a, math.nan)
    else:
        u = a + torch.linalg.pinv(jac) @ rhs
    return tree.unravel(u[:-1], raveled), u[-1]


def dense_matrix(matvec, x) -> tuple[torch.Tensor, tree.Raveled]:
    """The matrix of ``matvec`` in the raveled coordinates of ``x`` (``n`` products)."""
    raveled = tree.ravel(x)
    eye = torch.eye(raveled.flat.numel(), dtype=raveled.flat.dtype, device=raveled.flat.device)
    columns = [tree.ravel(matvec(tree.unravel(e, raveled))).flat for e in eye]
    return torch.stack(columns, 1), raveled


def ritz_extremes(matvec, start: PyTree, steps: int) -> tuple[float, float]:
    """Smallest and largest Ritz values of ``steps`` Lanczos steps (full
    reorthogonalization), the Hessian test at a ``t = 1`` crossing (Golub & Van Loan 10.1)."""
    basis, alphas, betas = [], [], []
    v = tree.scale(1 / tree.norm(start), start)
    for k in range(steps):
        basis.append(v)
        w = matvec(v)
        alphas.append(tree.vdot(v, w))
        for q in basis:  # full reorthogonalization (Gram-Schmidt twice)
            w = tree.axpy(-tree.vdot(q, w), q, w)
        for q in basis:
            w = tree.axpy(-tree.vdot(q, w), q, w)
        beta = tree.norm(w)
        if k + 1 == steps or float(beta) <= 1e-12 * max(abs(float(a)) for a in alphas):
            break
        betas.append(beta)
        v = tree.scale(1 / beta, w)
    t_mat = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        t_mat = t_mat + torch.diag(off, 1) + torch.diag(off, -1)
    eig = torch.linalg.eigvalsh(t_mat.double())
    return float(eig[0]), float(eig[-1])
